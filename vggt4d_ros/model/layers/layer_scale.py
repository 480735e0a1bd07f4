"""LayerScale: learned per-channel residual gain (key ``gamma``)."""
from __future__ import annotations

import torch
from torch import nn


class LayerScale(nn.Module):
    """x [..., dim] -> x * gamma; ``init_values`` = initial gain (0.01 aggregator, 1.0 DINO)."""

    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Not in place: the residual branch output may be a view needed elsewhere.
        return x * self.gamma
