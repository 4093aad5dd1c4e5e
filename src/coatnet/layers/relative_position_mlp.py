"""The relative-position bias of timm's "rmlp" CoAtNets: an MLP over log-spaced 2-D offsets.

Instead of a learned table w[dy, dx], each head's bias is mlp(sign(d) * log(1 + |d|)) for the offset
d = (dy, dx) (the log-spaced coordinates of Swin-V2, Liu et al. 2022, in timm's "cr" form). The MLP holds
no per-resolution state: any map size gets its table by evaluating the MLP on that size's offsets.
"""
from __future__ import annotations

import torch
from torch import nn


def log_spaced_offsets(height: int, width: int, device=None, dtype=None) -> torch.Tensor:
    """(2H-1, 2W-1, 2) grid of (dy, dx) offsets, each mapped to sign(d) * log(1 + |d|)."""
    dy = torch.arange(-(height - 1), height, device=device, dtype=torch.float32)
    dx = torch.arange(-(width - 1), width, device=device, dtype=torch.float32)
    grid = torch.stack(torch.meshgrid(dy, dx, indexing="ij"), dim=-1)
    return (torch.sign(grid) * torch.log1p(grid.abs())).to(dtype or torch.float32)


class RelativePositionMlp(nn.Module):
    """2 -> hidden (ReLU, dropout 0.125 in training, as timm) -> heads. `table(size)` returns the
    (heads, 2H-1, 2W-1) bias table for an H x W map, laid out like RelativeAttention2d's learned table."""

    def __init__(self, num_heads: int, hidden: int = 512, dropout: float = 0.125):
        super().__init__()
        self.fc1 = nn.Linear(2, hidden)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, num_heads)

    def table(self, size: tuple[int, int]) -> torch.Tensor:
        coords = log_spaced_offsets(*size, device=self.fc1.weight.device, dtype=self.fc1.weight.dtype)
        return self.fc2(self.drop(self.act(self.fc1(coords)))).permute(2, 0, 1)  # (heads, 2H-1, 2W-1)
