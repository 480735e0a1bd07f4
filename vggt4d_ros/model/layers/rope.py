"""2-D rotary position embedding (RoPE) for patch tokens on an h x w grid.

Positions: patch (row y, column x) gets (y + 1, x + 1); the special tokens (camera, registers)
get (0, 0), i.e. no rotation. The head dimension d is split in halves: the first half is rotated
by the row, the second by the column. Within a half of size d/2, the "rotate-half" convention
pairs channel i with channel i + d/4: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) with
inverse frequencies 1 / base^(2i / (d/2)), i = 0 .. d/4 - 1.

Tables are built once per forward and shared by every block (the positions never change within
a forward), so RoPE costs two multiply-adds per element in each attention block.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import torch


@dataclass
class RopeTables:
    """cos / sin per token, [T, d] each (d = head dim), for one frame's token sequence."""

    cos: torch.Tensor
    sin: torch.Tensor

    def tile(self, repeats: int) -> "RopeTables":
        """Tables for ``repeats`` frames concatenated frame-major ([repeats*T, d])."""
        if repeats == 1:
            return self
        return RopeTables(self.cos.repeat(repeats, 1), self.sin.repeat(repeats, 1))

    def to(self, dtype: torch.dtype) -> "RopeTables":
        if self.cos.dtype == dtype:
            return self
        return RopeTables(self.cos.to(dtype), self.sin.to(dtype))


def grid_positions(h: int, w: int, num_special: int, device: torch.device | str = "cpu"
                   ) -> torch.Tensor:
    """Integer (row, col) positions [num_special + h*w, 2]: specials (0,0), patch (y+1, x+1).

    Patch token i = y * w + x (row-major), as produced by the patchify conv.
    """
    y = torch.arange(h, device=device).repeat_interleave(w)
    x = torch.arange(w, device=device).repeat(h)
    patch = torch.stack([y, x], dim=-1) + 1
    special = torch.zeros(num_special, 2, dtype=patch.dtype, device=device)
    return torch.cat([special, patch], dim=0)


class RotaryPositionEmbedding2D(torch.nn.Module):
    """Builds RoPE tables and applies them to q / k of shape [B', heads, T, d]."""

    def __init__(self, base: float = 100.0) -> None:
        super().__init__()
        self.base = float(base)
        self._cache: Dict[Tuple, RopeTables] = {}

    def tables(self, h: int, w: int, num_special: int, head_dim: int,
               device: torch.device | str) -> RopeTables:
        """cos/sin [num_special + h*w, head_dim] in float32 for one frame (cached per grid)."""
        if head_dim % 4:
            raise ValueError(f"2-D RoPE needs head_dim divisible by 4, got {head_dim}")
        key = (h, w, num_special, head_dim, str(device))
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        half = head_dim // 2
        inv_freq = 1.0 / (self.base ** (torch.arange(0, half, 2, device=device).float() / half))
        pos = grid_positions(h, w, num_special, device).float()          # [T, 2]
        ang_y = pos[:, 0:1] * inv_freq[None, :]                          # [T, half/2]
        ang_x = pos[:, 1:2] * inv_freq[None, :]
        ang = torch.cat([ang_y, ang_y, ang_x, ang_x], dim=-1)            # [T, head_dim]
        tab = RopeTables(ang.cos(), ang.sin())
        if len(self._cache) > 16:  # bounded: a stream uses one or two resolutions
            self._cache.clear()
        self._cache[key] = tab
        return tab

    @staticmethod
    def apply(x: torch.Tensor, tab: RopeTables) -> torch.Tensor:
        """Rotate x [B', heads, T, d] with tables [T, d] (computed in x's dtype)."""
        tab = tab.to(x.dtype)
        return x * tab.cos + _rotate_halves(x) * tab.sin


def _rotate_halves(x: torch.Tensor) -> torch.Tensor:
    """rotate-half within each of the two halves (row half, column half) of the last dim."""
    a, b, c, d = x.chunk(4, dim=-1)
    return torch.cat([-b, a, -d, c], dim=-1)
