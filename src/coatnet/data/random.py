"""Counter-based randomness: every random number of the data pipeline is a pure function of
(seed, epoch, sample index, stream).

Nothing is drawn from a global generator consumed in order, so the augmentation a sample receives does not
depend on batch composition, on how many processes share a batch, or on whether a run was resumed.
"""
from __future__ import annotations

import numpy as np
import torch

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # (x * c) mod 2^32 for x < 2^32, split in 16-bit halves so no int64 product overflows.
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & _M32) << 16
    return (lo + hi) & _M32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply), elementwise on an int64 tensor."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def mix_int(*values: int) -> int:
    """Hash Python ints into one 32-bit key."""
    h = 0x243F6A88
    for v in values:
        h = int(mix32(torch.tensor([(h ^ (int(v) & _M32)) * 1 + 0x9E3779B9], dtype=torch.int64))[0])
    return h


def uniform(seed: int, epoch: int, index: torch.Tensor, stream: int) -> torch.Tensor:
    """Uniform [0, 1) floats, one per entry of `index` (int64), fixed by (seed, epoch, index, stream)."""
    key = mix_int(seed, epoch, stream)
    h = mix32(mix32(index.to(torch.int64) ^ key) + (key >> 3))
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


def numpy_rng(seed: int, epoch: int, index: int, stream: int) -> np.random.Generator:
    """A numpy generator for draws that need a distribution (e.g. Beta), fixed by the same key."""
    return np.random.default_rng([seed & _M32, epoch, int(index), stream])


def permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The data order of an epoch: a permutation of range(n) fixed by (seed, epoch)."""
    g = torch.Generator().manual_seed(mix_int(seed, epoch, 0x5EED))
    return torch.randperm(n, generator=g)
