"""DINOv2 vision transformer with register tokens (VGGT's patch embed; ViT-L/14 for VGGT-1B).

Keys: ``cls_token`` [1,1,C], ``pos_embed`` [1, 1+G², C] (G = img_size/patch = 37),
``register_tokens`` [1,R,C], ``mask_token`` [1,C] (kept for checkpoint compatibility, unused at
inference), ``patch_embed.proj`` (conv patch x patch, stride patch), ``blocks.N``, ``norm``.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from ..config import PatchEmbedConfig
from .block import Block


class PatchEmbed(nn.Module):
    """images [B, 3, H, W] -> patch tokens [B, (H/p)(W/p), C], row-major over the grid."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class DinoVisionTransformer(nn.Module):
    """DINOv2-with-registers encoder returning the final-normed patch tokens."""

    def __init__(self, cfg: PatchEmbedConfig) -> None:
        super().__init__()
        c = cfg.embed_dim
        self.cfg = cfg
        self.patch_size = cfg.patch_size
        self.num_register_tokens = cfg.num_register_tokens
        self.patch_embed = PatchEmbed(cfg.patch_size, 3, c)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.pos_grid ** 2, c))
        self.register_tokens = nn.Parameter(torch.zeros(1, cfg.num_register_tokens, c))
        self.mask_token = nn.Parameter(torch.zeros(1, c))
        self.blocks = nn.ModuleList([
            Block(c, cfg.num_heads, cfg.mlp_ratio, qkv_bias=cfg.qkv_bias,
                  proj_bias=cfg.proj_bias, ffn_bias=cfg.ffn_bias, qk_norm=False,
                  init_values=cfg.init_values, norm_eps=cfg.layer_norm_eps)
            for _ in range(cfg.depth)
        ])
        self.norm = nn.LayerNorm(c, eps=cfg.layer_norm_eps)
        nn.init.normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        nn.init.normal_(self.register_tokens, std=1e-6)

    def interpolate_pos_embed(self, gh: int, gw: int, dtype: torch.dtype) -> torch.Tensor:
        """Positional embedding for a gh x gw patch grid: [1, 1 + gh*gw, C].

        The stored square grid is resized bicubically (antialias) to exactly (gh, gw) with
        ``size=`` (interpolate_offset 0); returned unchanged when the grid matches.
        Computed in float32 like the reference, then cast to ``dtype``.
        """
        g = self.cfg.pos_grid
        if gh == g and gw == g:
            return self.pos_embed.to(dtype)
        pe = self.pos_embed.float()
        cls_pe, patch_pe = pe[:, :1], pe[:, 1:]
        c = pe.shape[-1]
        grid = patch_pe.reshape(1, g, g, c).permute(0, 3, 1, 2)
        if self.cfg.interpolate_offset:
            off = self.cfg.interpolate_offset
            grid = F.interpolate(grid, scale_factor=((gh + off) / g, (gw + off) / g),
                                 mode="bicubic", antialias=self.cfg.interpolate_antialias)
        else:
            grid = F.interpolate(grid, size=(gh, gw), mode="bicubic",
                                 antialias=self.cfg.interpolate_antialias)
        patch_pe = grid.permute(0, 2, 3, 1).reshape(1, gh * gw, c)
        return torch.cat([cls_pe, patch_pe], dim=1).to(dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] (ImageNet-normalised) -> x_norm_patchtokens [B, N, C]."""
        b, _, h, w = images.shape
        gh, gw = h // self.patch_size, w // self.patch_size
        x = self.patch_embed(images)
        # No casts: under autocast the conv output is bf16 and the float32 cls token promotes
        # the residual stream to float32, as in the reference.
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
        x = x + self.interpolate_pos_embed(gh, gw, x.dtype)
        x = torch.cat([x[:, :1], self.register_tokens.expand(b, -1, -1), x[:, 1:]], dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return x[:, 1 + self.num_register_tokens:]


def num_patches(h: int, w: int, patch_size: int) -> int:
    """Patch tokens per frame for an h x w (pixels) image."""
    return (h // patch_size) * (w // patch_size) if h > 0 and w > 0 else 0


__all__ = ["DinoVisionTransformer", "PatchEmbed", "num_patches"]
