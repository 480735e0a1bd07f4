"""Sampling and embedding helpers of the point tracker.

Coordinates are (x, y) in pixels of the map being sampled, x right, y down; integer values hit
pixel centres (the ``align_corners=True`` convention of ``grid_sample``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def grid_sincos_embed(dim: int, height: int, width: int, *, device: Optional[torch.device] = None,
                      dtype: torch.dtype = torch.float32, base: float = 10000.0) -> torch.Tensor:
    """2-D sin/cos embedding of the integer pixel grid of a ``height x width`` map.

    Channel layout: [sin(x w), cos(x w), sin(y w), cos(y w)], each dim/4 wide, with
    w_i = base^(-i / (dim/4)). Used by the tracker as a position code of the query point.

    Returns:
        [1, dim, height, width].
    """
    if dim % 4:
        raise ValueError(f"grid embedding dim must be a multiple of 4, got {dim}")
    quarter = dim // 4
    omega = torch.arange(quarter, dtype=torch.float32, device=device) / float(quarter)
    omega = 1.0 / base ** omega
    xs = torch.arange(width, dtype=torch.float32, device=device)[:, None] * omega[None]    # [W, q]
    ys = torch.arange(height, dtype=torch.float32, device=device)[:, None] * omega[None]   # [H, q]
    ex = torch.cat([xs.sin(), xs.cos()], dim=1)                                            # [W, 2q]
    ey = torch.cat([ys.sin(), ys.cos()], dim=1)                                            # [H, 2q]
    emb = torch.cat([ex[None].expand(height, -1, -1), ey[:, None].expand(-1, width, -1)], dim=-1)
    return emb.permute(2, 0, 1)[None].to(dtype)


def flow_embed(xy: torch.Tensor, dim: int) -> torch.Tensor:
    """Sin/cos code of 2-D displacements, as the tracker was trained with.

    Frequencies are *linear*, f_k = 2k * 1000 / dim (k < dim/2), and sin/cos are interleaved:
    per axis [sin(x f_0), cos(x f_0), sin(x f_1), ...]; x-code then y-code.

    Args:
        xy: [M, T, 2] displacements in feature-map pixels.
    Returns:
        [M, T, 2*dim] float32.
    """
    if xy.shape[-1] != 2 or dim % 2:
        raise ValueError(f"flow_embed needs [..., 2] input and even dim, got {tuple(xy.shape)}, {dim}")
    freq = torch.arange(0, dim, 2, device=xy.device, dtype=torch.float32) * (1000.0 / dim)

    def axis(v: torch.Tensor) -> torch.Tensor:
        a = v.float()[..., None] * freq                                  # [..., dim/2]
        return torch.stack([a.sin(), a.cos()], dim=-1).flatten(-2)       # interleave -> [..., dim]

    return torch.cat([axis(xy[..., 0]), axis(xy[..., 1])], dim=-1)


def pixel_to_grid(coords: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pixel (x, y) -> grid_sample's [-1, 1] range with align_corners=True. Any leading shape."""
    scale = torch.tensor([2.0 / max(width - 1, 1), 2.0 / max(height - 1, 1)],
                         device=coords.device, dtype=coords.dtype)
    return coords * scale - 1.0


def sample_points(fmap: torch.Tensor, coords: torch.Tensor, padding_mode: str = "border") -> torch.Tensor:
    """Bilinear features at points.

    Args:
        fmap: [B, C, H, W].
        coords: [B, R, 2] pixel (x, y) in fmap.
    Returns:
        [B, R, C].
    """
    B, C, H, W = fmap.shape
    grid = pixel_to_grid(coords.to(fmap.dtype), H, W)[:, :, None]         # [B, R, 1, 2]
    out = F.grid_sample(fmap, grid, mode="bilinear", padding_mode=padding_mode, align_corners=True)
    return out[..., 0].permute(0, 2, 1)                                    # [B, R, C]


def window_offsets(radius: int, device: Optional[torch.device] = None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Offsets of the (2r+1)^2 correlation window in the tracker's order.

    Element k = i*(2r+1) + j is (dx, dy) = (i - r, j - r): the *first* (outer) index moves x.
    (The official window is built with its two axes swapped; since the window is square this
    only fixes the order in which the correlation MLP sees the samples, which must match the
    checkpoint.)

    Returns:
        [(2r+1)^2, 2].
    """
    d = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    di, dj = torch.meshgrid(d, d, indexing="ij")
    return torch.stack([di, dj], dim=-1).reshape(-1, 2)
