"""Pre-norm transformer block: x + ls1(attn(norm1 x)), then x + ls2(mlp(norm2 x))."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .attention import Attention, KeySelection, QKCallback
from .layer_scale import LayerScale
from .mlp import Mlp
from .rope import RopeTables


class Block(nn.Module):
    """Transformer block on x [B', T, C]; keys norm1, attn, ls1, norm2, mlp, ls2.

    ``init_values`` None/0 -> no LayerScale (Identity), as in the official blocks.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_bias: bool = True, ffn_bias: bool = True, qk_norm: bool = False,
                 init_values: Optional[float] = None, norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        # qk-norm LayerNorms use torch's default eps in every official block.
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias,
                              qk_norm=qk_norm)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), bias=ffn_bias)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()

    def forward(self, x: torch.Tensor, rope: Optional[RopeTables] = None,
                on_qk: Optional[QKCallback] = None,
                keys: Optional[KeySelection] = None) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), rope=rope, on_qk=on_qk, keys=keys))
        return x + self.ls2(self.mlp(self.norm2(x)))
