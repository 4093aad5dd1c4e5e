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


def _mix32_int(x: int) -> int:
    """`mix32` of one Python int, in Python: the same numbers, no tensor (nothing for torch.compile to break on,
    nothing read back from a device)."""
    x &= _M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def mix_int(*values: int) -> int:
    """Hash Python ints into one 32-bit key."""
    h = 0x243F6A88
    for v in values:
        h = _mix32_int((h ^ (int(v) & _M32)) + 0x9E3779B9)
    return h


def uniform(seed: int, epoch: int, index: torch.Tensor, stream: int) -> torch.Tensor:
    """Uniform [0, 1) floats, one per entry of `index` (int64), fixed by (seed, epoch, index, stream)."""
    key = mix_int(seed, epoch, stream)
    h = mix32(mix32(index.to(torch.int64) ^ key) + (key >> 3))
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


def uniform_streams(seed: int, epoch: int, index: torch.Tensor, streams: list[int]) -> torch.Tensor:
    """`uniform(seed, epoch, index, s)` for every s of `streams` at once: (len(index), len(streams)), column j
    that of streams[j], on index's device (the keys are computed on the host, the hashes with tensor ops)."""
    keys = [mix_int(seed, epoch, s) for s in streams]
    key = torch.tensor(keys, dtype=torch.int64).to(index.device, non_blocking=True).view(1, -1)  # (1, S)
    h = mix32(mix32(index.to(torch.int64).view(-1, 1) ^ key) + (key >> 3))  # (B, S)
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


def numpy_rng(seed: int, epoch: int, index: int, stream: int) -> np.random.Generator:
    """A numpy generator for draws that need a distribution (e.g. Beta), fixed by the same key."""
    return np.random.default_rng([seed & _M32, epoch, int(index), stream])


def permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The data order of an epoch: a permutation of range(n) fixed by (seed, epoch)."""
    g = torch.Generator().manual_seed(mix_int(seed, epoch, 0x5EED))
    return torch.randperm(n, generator=g)
