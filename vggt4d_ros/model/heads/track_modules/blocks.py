"""Update transformer and correlation pyramid of the point tracker (CoTracker-style).

``EfficientUpdateFormer``: tokens [B, N tracks, T frames, C]; alternates attention along time
(per track) with attention across tracks routed through learned "virtual tracks" (per frame).
``CorrPyramid``: local correlation windows of track features against per-frame feature maps at
``levels`` scales (each an average-pool x2 of the previous one).
"""
from __future__ import annotations

import math
from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F

from .modules import AttnBlock, CrossAttnBlock
from .utils import pixel_to_grid, window_offsets


class EfficientUpdateFormer(nn.Module):
    """Predicts per-track, per-frame updates (2 coordinate deltas + feature delta).

    Args:
        space_depth: number of cross-track stages (each: virtual<-points, virtual self-attn,
            points<-virtual); 0 disables them.
        time_depth: number of time-attention blocks.
        input_dim: token width in; hidden_size: transformer width; output_dim: width out.
        num_heads: attention heads (8 in VGGT's tracker).
        num_virtual_tracks: learned tokens mediating attention across tracks (64).
    """

    def __init__(self, space_depth: int = 6, time_depth: int = 6, input_dim: int = 320,
                 hidden_size: int = 384, num_heads: int = 8, output_dim: int = 130,
                 mlp_ratio: float = 4.0, add_space_attn: bool = True,
                 num_virtual_tracks: int = 64) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.add_space_attn = bool(add_space_attn and space_depth > 0)
        self.num_virtual_tracks = num_virtual_tracks
        self.input_norm = nn.LayerNorm(input_dim)
        self.input_transform = nn.Linear(input_dim, hidden_size)
        self.output_norm = nn.LayerNorm(hidden_size)
        self.flow_head = nn.Linear(hidden_size, output_dim)
        self.time_blocks = nn.ModuleList(
            [AttnBlock(hidden_size, num_heads, mlp_ratio) for _ in range(time_depth)])
        if self.add_space_attn:
            if time_depth < space_depth:
                raise ValueError(f"time_depth ({time_depth}) must be >= space_depth ({space_depth})")
            # (sic) the official parameter name is misspelt; keep it for checkpoint keys.
            self.virual_tracks = nn.Parameter(torch.randn(1, num_virtual_tracks, 1, hidden_size))
            self.space_virtual_blocks = nn.ModuleList(
                [AttnBlock(hidden_size, num_heads, mlp_ratio) for _ in range(space_depth)])
            self.space_point2virtual_blocks = nn.ModuleList(
                [CrossAttnBlock(hidden_size, num_heads, mlp_ratio) for _ in range(space_depth)])
            self.space_virtual2point_blocks = nn.ModuleList(
                [CrossAttnBlock(hidden_size, num_heads, mlp_ratio) for _ in range(space_depth)])
        else:
            self.virual_tracks = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, N, T, input_dim] -> [B, N, T, output_dim]."""
        tokens = self.input_transform(self.input_norm(x))
        init_tokens = tokens
        B, N, T, C = tokens.shape
        if self.add_space_attn:
            virtual = self.virual_tracks.expand(B, -1, T, -1).to(tokens.dtype)
            tokens = torch.cat([tokens, virtual], dim=1)
        M = tokens.shape[1]
        every = len(self.time_blocks) // len(self.space_virtual_blocks) if self.add_space_attn else 0
        j = 0
        for i, block in enumerate(self.time_blocks):
            tokens = block(tokens.reshape(B * M, T, C)).reshape(B, M, T, C)
            if self.add_space_attn and i % every == 0:
                space = tokens.permute(0, 2, 1, 3).reshape(B * T, M, C)
                points, virtual = space[:, :N], space[:, N:]
                virtual = self.space_virtual2point_blocks[j](virtual, points)
                virtual = self.space_virtual_blocks[j](virtual)
                points = self.space_point2virtual_blocks[j](points, virtual)
                space = torch.cat([points, virtual], dim=1)
                tokens = space.reshape(B, T, M, C).permute(0, 2, 1, 3)
                j += 1
        tokens = tokens[:, :N] + init_tokens
        return self.flow_head(self.output_norm(tokens))


class CorrPyramid:
    """Multi-scale local correlation of track features against frame feature maps.

    Args:
        fmaps: [B, S, C, H, W] (already normalised) feature maps.
        num_levels: pyramid levels; level l is avg-pooled 2^l times (floor sizes).
        radius: window radius r; each level gives (2r+1)^2 samples.
    """

    def __init__(self, fmaps: torch.Tensor, num_levels: int = 4, radius: int = 4) -> None:
        if fmaps.ndim != 5:
            raise ValueError(f"fmaps must be [B, S, C, H, W], got {tuple(fmaps.shape)}")
        self.num_levels = num_levels
        self.radius = radius
        B, S, C, H, W = fmaps.shape
        level = fmaps.reshape(B * S, C, H, W)
        self.levels: List[torch.Tensor] = [level]
        for _ in range(num_levels - 1):
            level = F.avg_pool2d(level, kernel_size=2, stride=2)
            self.levels.append(level)
        self.shape = (B, S, C)

    def sample(self, targets: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """Correlations around each track position.

        corr(p) = <target, f(p)> / sqrt(C), sampled bilinearly at p = coords/2^l + offset with
        zero padding outside the map. Bilinear sampling is linear, so we sample the feature
        maps and take dot products, which equals sampling the full correlation volume but
        never materialises [S, N, H, W].

        Args:
            targets: [B, S, N, C] track features per frame.
            coords: [B, S, N, 2] track positions (x, y) in level-0 pixels.
        Returns:
            [B, S, N, num_levels * (2r+1)^2].
        """
        B, S, C = self.shape
        N = targets.shape[2]
        offs = window_offsets(self.radius, device=coords.device, dtype=coords.dtype)  # [K, 2]
        K = offs.shape[0]
        t = targets.reshape(B * S, N, C)
        out = []
        for lvl, fmap in enumerate(self.levels):
            h, w = fmap.shape[-2:]
            pts = coords.reshape(B * S, N, 1, 2) / (2 ** lvl) + offs[None, None]      # [BS, N, K, 2]
            grid = pixel_to_grid(pts.to(fmap.dtype), h, w)
            feats = F.grid_sample(fmap, grid, mode="bilinear", padding_mode="zeros",
                                  align_corners=True)                                # [BS, C, N, K]
            corr = torch.einsum("bnc,bcnk->bnk", t.to(fmap.dtype), feats) / math.sqrt(C)
            out.append(corr.reshape(B, S, N, K))
        return torch.cat(out, dim=-1)
