"""Two-layer feed-forward network (fc1 -> GELU -> fc2), official key names ``fc1``/``fc2``."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn


class Mlp(nn.Module):
    """Position-wise MLP. x [..., in] -> [..., out]."""

    def __init__(self, in_features: int, hidden_features: Optional[int] = None,
                 out_features: Optional[int] = None,
                 act_layer: Callable[[], nn.Module] = nn.GELU, bias: bool = True) -> None:
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))
