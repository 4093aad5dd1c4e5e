"""Process-group hooks: the only place the engine learns its rank and world size.

Single-process runs use the defaults (rank 0 of 1). The data order is defined per *global* batch and rank r
takes `shard(batch, r, world)`, so the batches seen, the augmentation of each sample (keyed by its index)
and the schedule do not depend on the number of processes. A distributed launcher (torchrun) needs only to
initialise torch.distributed, then `wrap_model` (DDP + SyncBatchNorm) and the reductions here take effect.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_and_world()[0] == 0


def shard(global_batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank `rank`'s contiguous slice of a global batch of indices. Slices start at even offsets when the
    per-rank size is even (Mixup pairs neighbours (0,1), (2,3), ...)."""
    n = len(global_batch)
    per = -(-n // world)
    return global_batch[rank * per: (rank + 1) * per]


def all_reduce_sums(values: list[float]) -> list[float]:
    """Sum floats over all processes (identity in a single process)."""
    _, world = rank_and_world()
    if world == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64,
                     device="cuda" if torch.cuda.is_available() and dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def wrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module to train: as is in one process (the [scale] work adds DDP with SyncBatchNorm here)."""
    return model


def barrier() -> None:
    if rank_and_world()[1] > 1:
        dist.barrier()
