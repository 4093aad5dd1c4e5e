"""Layer scale (Touvron et al. 2021, CaiT): a learned per-channel factor on a residual branch."""
from __future__ import annotations

import torch
from torch import nn


class LayerScale(nn.Module):
    """x * gamma over the last axis of a channels-last (..., C) tensor; gamma starts at `init`."""

    def __init__(self, channels: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((channels,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma
