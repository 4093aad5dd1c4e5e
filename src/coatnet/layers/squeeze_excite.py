"""Squeeze-and-excitation (Hu et al. 2018) as used inside MBConv (CoAtNet paper, Sec. 2.1)."""
from __future__ import annotations

import torch
from torch import nn


class SqueezeExcite(nn.Module):
    """Channel gating of a (B, C, H, W) map: x * sigmoid(fc2(act(fc1(mean_hw(x)))))."""

    def __init__(self, channels: int, reduced: int, act_layer: type[nn.Module] = nn.GELU):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.act = act_layer()
        self.fc2 = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = x.mean((2, 3), keepdim=True)  # (B, C, 1, 1)
        return x * self.fc2(self.act(self.fc1(scale))).sigmoid()
