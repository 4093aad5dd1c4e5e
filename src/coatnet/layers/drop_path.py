"""Stochastic depth (Huang et al. 2016), used by the paper's training recipe (Sec. 4, Table 9)."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch
from torch import nn

# (batch size, stream) -> (batch size,) uniforms in [0, 1), one per sample of the batch being computed; None:
# draw from torch's global generator. Set by `drop_path_noise` (training engines).
_noise: Optional[Callable[[int, int], torch.Tensor]] = None


@contextlib.contextmanager
def drop_path_noise(noise: Callable[[int, int], torch.Tensor]) -> Iterator[None]:
    """Within the block, every DropPath draws its per-sample uniforms from `noise(batch, stream)`, `stream`
    being the DropPath's own number. A noise keyed by the samples (not their position in a batch) makes
    the masks independent of how a batch is split between processes or micro-batches. Keep the forward
    and the backward inside: activation checkpointing recomputes the masks in backward."""
    global _noise
    previous, _noise = _noise, noise
    try:
        yield
    finally:
        _noise = previous


def drop_path(x: torch.Tensor, rate: float, training: bool, stream: int = 0) -> torch.Tensor:
    """Zero whole samples of a residual branch with probability `rate`, rescaling the survivors."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    shape = [x.shape[0]] + [1] * (x.ndim - 1)
    if not torch.jit.is_scripting():  # TorchScript has no noise hook: it draws from torch's generator
        if _noise is not None:
            return x * (_noise(x.shape[0], stream).to(x.device) < keep).to(x.dtype).view(shape) / keep
    return x * x.new_empty(shape).bernoulli_(keep) / keep


class DropPath(nn.Module):
    def __init__(self, rate: float = 0.0, stream: int = 0):
        super().__init__()
        self.rate = rate
        self.stream = stream  # which of `drop_path_noise`'s streams this layer draws from

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.rate, self.training, self.stream)

    def extra_repr(self) -> str:
        return f"rate={self.rate}"
