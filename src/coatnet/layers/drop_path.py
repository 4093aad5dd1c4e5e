"""Stochastic depth (Huang et al. 2016), used by the paper's training recipe (Sec. 4, Table 9).

The per-sample noise is an input, never state: a model's forward takes `drop_path_noise`, uniforms (B, L) in
[0, 1) with one column per DropPath layer (the layer's `stream`), and each layer keeps sample b of its branch
where column `stream` of row b is below 1 - rate. Without it, a layer draws from torch's global generator.
Noise keyed by the samples (the training engine derives it from (seed, step, sample index)) makes the masks
independent of how a batch is split between processes or micro-batches, lets activation checkpointing
recompute the same masks, and leaves torch.compile one graph with nothing to guard on but shapes.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def drop_path(x: torch.Tensor, rate: float, training: bool, noise: Optional[torch.Tensor] = None,
              stream: int = 0) -> torch.Tensor:
    """Zero whole samples of a residual branch x (B, ...) with probability `rate`, rescaling the survivors:
    sample b survives where noise[b, stream] < 1 - rate (noise (B, L) uniforms), or by a Bernoulli draw from
    torch's generator when `noise` is None."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    shape = [x.shape[0]] + [1] * (x.ndim - 1)
    if noise is None:
        return x * x.new_empty(shape).bernoulli_(keep) / keep
    return x * (noise[:, stream] < keep).to(x.dtype).view(shape) / keep


class DropPath(nn.Module):
    def __init__(self, rate: float = 0.0, stream: int = 0):
        super().__init__()
        self.rate = rate
        self.stream = stream  # which column of the model's drop_path_noise this layer reads

    def forward(self, x: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        return drop_path(x, self.rate, self.training, noise, self.stream)

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


def drop_path_streams(model: nn.Module) -> int:
    """Columns a `drop_path_noise` input of `model` needs: one past the highest stream of its DropPath layers
    that drop anything (0: the model drops nothing and takes no noise)."""
    return max((m.stream + 1 for m in model.modules() if isinstance(m, DropPath) and m.rate > 0), default=0)
