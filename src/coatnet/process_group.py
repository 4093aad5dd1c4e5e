"""This process's place among the processes of a run (rank, world size) and the collectives every layer may
use: a neutral module, imported by data/ (each process reads its own shards) and train/ alike.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; without them everything here runs
as one process and every collective is the identity.
"""
from __future__ import annotations

import atexit
import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .device_plan import device_plan


@dataclass(frozen=True)
class DistributedEnv:
    """Where this process sits among the processes of one training run."""

    rank: int = 0  # index of this process among all processes (0 writes files and prints)
    world_size: int = 1  # number of processes in the run
    local_rank: int = 0  # index of this process on its machine: picks its GPU
    backend: str = ""  # "gloo" (CPU only), "cpu:gloo,cuda:nccl" (GPUs), "" (one process, no process group)

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer") from None


def init_distributed(timeout_s: float = 1800.0) -> DistributedEnv:
    """Join the process group torchrun describes in the environment and return this process's place in it.
    A single process (WORLD_SIZE unset or 1) creates no group. Collectives on CPU tensors go through gloo and
    on CUDA tensors through NCCL, so the device stays the runtime's decision; each process's default GPU is
    the one numbered LOCAL_RANK."""
    if dist.is_available() and dist.is_initialized():
        return current_env()
    world_size = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if world_size <= 1:
        return DistributedEnv()
    if not dist.is_available():
        raise RuntimeError("this PyTorch build has no torch.distributed; cannot train with several processes")
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is outside 0..WORLD_SIZE-1={world_size - 1}")
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local_rank} but this machine has {torch.cuda.device_count()} GPU(s); "
                             f"use --nproc-per-node {torch.cuda.device_count()} or fewer")
        torch.cuda.set_device(local_rank)
    backend, timeout = device_plan(device_type).dist_backend, datetime.timedelta(seconds=timeout_s)
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is None:
        dist.init_process_group(backend, timeout=timeout)
    else:
        # Under torchrun the workers of every restart share the agent's store, and the keys where the previous
        # attempt's processes published their addresses are still there: gloo then connects to dead ports (seen:
        # "connectFullMesh failed ... Connection refused", or a hang). Each attempt gets keys of its own.
        store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world_size, timeout=timeout))
        store = dist.PrefixStore(f"coatnet/attempt_{restart}/", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    atexit.register(destroy_distributed, sync=False)  # a crashed peer must not hold this process's exit
    return current_env()


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process, joining torchrun's process group on first use."""
    env = init_distributed()
    return env.rank, env.world_size


def current_env() -> DistributedEnv:
    """This process's place in the current process group (one process when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistributedEnv()
    return DistributedEnv(rank=dist.get_rank(), world_size=dist.get_world_size(),
                          local_rank=_env_int("LOCAL_RANK", 0), backend=str(dist.get_backend()))


def destroy_distributed(sync: bool = True) -> None:
    """Leave the process group (no-op without one). With `sync`, first wait for every rank: a rank that tore its
    gloo connections down while rank 0 still wrote a file aborted in the teardown (SIGABRT, seen in CI with
    tests/distributed_worker.py)."""
    if dist.is_available() and dist.is_initialized():
        if sync:
            barrier()
        dist.destroy_process_group()


def is_active() -> bool:
    """True when this process is one of several in a process group (collectives do something)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main() -> bool:
    """True on rank 0, and in a single process: the one process that writes files and prints."""
    return not is_active() or dist.get_rank() == 0


def barrier() -> None:
    if is_active():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s value of a picklable object on every rank (e.g. a run folder named by a clock).
    Only for objects this program created itself: never for data read from files."""
    if not is_active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sums(values: list[float] | dict[str, float]) -> list[float] | dict[str, float]:
    """Sum each value over all ranks (in float64 on CPU, so counts stay exact); a list or a dict of floats
    in, the same out. Metrics are reduced as sums (loss x samples, correct predictions, samples) and divided
    afterwards, never averaged as ratios."""
    keys = list(values) if isinstance(values, dict) else None
    flat = [float(values[k]) for k in keys] if keys is not None else [float(v) for v in values]
    if is_active() and flat:
        t = torch.tensor(flat, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        flat = t.tolist()
    return dict(zip(keys, flat)) if keys is not None else flat


def any_rank(flag: torch.Tensor) -> torch.Tensor:
    """A 0/1 tensor (on any device) -> 1 where any rank's is 1: a collective on the tensor's device (NCCL for
    CUDA tensors: nothing waits on the host); the tensor itself in one process."""
    if is_active():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag


def local_threads() -> int:
    """CPU threads for this process: the machine's cores shared by the processes torchrun started on it."""
    return max(1, (os.cpu_count() or 1) // max(1, _env_int("LOCAL_WORLD_SIZE", 1)))
