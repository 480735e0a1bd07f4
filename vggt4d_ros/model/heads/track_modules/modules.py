"""Transformer building blocks of the tracker's update network.

Attribute names reproduce the official checkpoint keys (``norm1``, ``attn`` / ``cross_attn``
as ``nn.MultiheadAttention`` with ``in_proj_weight``, ``mlp.fc1`` ...).

QUIRK kept for checkpoint fidelity: both blocks add the attention output to the *normalised*
input (x = norm1(x); x = x + attn(x)), not to the raw input as a usual pre-norm block would.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn


class Mlp(nn.Module):
    """fc1 -> GELU (exact) -> fc2. x: [..., in] -> [..., out]."""

    def __init__(self, in_features: int, hidden_features: Optional[int] = None,
                 out_features: Optional[int] = None) -> None:
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class AttnBlock(nn.Module):
    """Self-attention block: x = LN1(x); x = x + MHA(x); x = x + MLP(LN2(x)). x: [B, T, C]."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.attn = nn.MultiheadAttention(hidden_size, num_heads, batch_first=True)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x)
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class CrossAttnBlock(nn.Module):
    """Cross-attention block: x = LN1(x); x = x + MHA(x, LNc(ctx)); x = x + MLP(LN2(x)).

    x: [B, T, C] queries, context: [B, T', C] keys/values.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size)
        self.norm_context = nn.LayerNorm(hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.cross_attn = nn.MultiheadAttention(hidden_size, num_heads, batch_first=True)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x)
        ctx = self.norm_context(context)
        x = x + self.cross_attn(x, ctx, ctx, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))
