"""The rank's slice of each global batch, its micro-batches, and the loss scale that makes N processes
reproduce one process with the same global batch (see the package docstring)."""
from __future__ import annotations

import torch


def rank_slice(global_size: int, rank: int, world_size: int) -> slice:
    """Contiguous slice of a global batch of `global_size` samples that rank `rank` trains on.

    Slices start at even offsets, because Mixup/CutMix pair neighbours (0, 1), (2, 3), ... of a batch; the
    pairs are spread as evenly as possible, so sizes differ by at most two. Together the slices cover the
    batch in order. A rank's slice is empty when the batch has fewer than 2 * world_size - 1 samples (the last
    batch of an epoch may): that rank still runs the step on zero samples, so the collectives match."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    pairs = (global_size + 1) // 2  # the last "pair" is a single sample when global_size is odd
    base, extra = divmod(pairs, world_size)
    first = rank * base + min(rank, extra)
    last = first + base + (1 if rank < extra else 0)
    return slice(min(2 * first, global_size), min(2 * last, global_size))


def shard(global_batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank `rank`'s part of a global batch of sample indices (see `rank_slice`)."""
    return global_batch[rank_slice(len(global_batch), rank, world)]


def split_micro_batches(local: torch.Tensor, global_size: int, world_size: int, micro: int) -> list[torch.Tensor]:
    """This rank's slice `local` of a global batch cut into micro-batches of `micro` samples. Every rank
    gets the same number of micro-batches (that of the largest slice, rank 0's), the last ones possibly
    empty, because each forward and backward is a collective (SyncBatchNorm, gradient reduction)."""
    largest = len(range(global_size)[rank_slice(global_size, 0, world_size)])
    count = max(1, -(-largest // micro))
    return [local[i * micro:(i + 1) * micro] for i in range(count)]


def loss_scale(local_size: int, global_size: int, world_size: int) -> float:
    """Factor on a rank's mean loss over its slice such that the mean over ranks of the scaled losses (what
    gradient averaging in DDP/FSDP computes) equals the mean loss over the global batch:
    mean_r(scale_r * mean_r) = sum_r(local_r * mean_r) / global_size."""
    return world_size * local_size / global_size
