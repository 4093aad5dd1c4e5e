"""Training across processes and machines with torchrun: process group, the rank's slice of each global
batch, synchronized BatchNorm, DDP and FSDP2 wrapping, metric reduction and full-state gathering.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; without them everything here runs
as one process and every collective is the identity.

Why N processes reproduce one process with the same global batch B:
- the sequence of global batches depends on the seed only; rank r trains on a contiguous slice of each
  (`rank_slice`), so the union over ranks is the batch one process would see;
- each rank's loss is its mean over its slice times `loss_scale(...)`, so that the mean over ranks that
  DDP and FSDP apply to gradients equals the gradient of the mean over the global batch;
- BatchNorm statistics are those of the global batch (`SyncBatchNorm`, also on CPU with gloo).
What remains is floating-point reordering of sums (relative differences ~1e-6 per step).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


# -- process group -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistributedEnv:
    """Where this process sits among the processes of one training run."""

    rank: int = 0  # index of this process among all processes (0 writes files and prints)
    world_size: int = 1  # number of processes in the run
    local_rank: int = 0  # index of this process on its machine: picks its GPU
    backend: str = ""  # "gloo" (CPU), "nccl" (GPU), or "" for a single process without a process group

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device_type: str) -> torch.device:
        """The device this process trains on: GPU `local_rank` for "cuda", else the device type as given."""
        return torch.device("cuda", self.local_rank) if device_type == "cuda" else torch.device(device_type)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer") from None


def init_distributed(device_type: str = "cpu", timeout_s: float = 1800.0) -> DistributedEnv:
    """Join the process group torchrun describes in the environment (gloo on CPU, NCCL on GPU) and return
    this process's place in it. A single process (WORLD_SIZE unset or 1) creates no group."""
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
    timeout = datetime.timedelta(seconds=timeout_s)
    if device_type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local_rank} but this machine has {torch.cuda.device_count()} GPU(s); "
                             f"use --nproc-per-node {torch.cuda.device_count()} or fewer")
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", timeout=timeout, device_id=torch.device("cuda", local_rank))
    else:
        dist.init_process_group("gloo", timeout=timeout)
    return current_env()


def current_env() -> DistributedEnv:
    """This process's place in the current process group (one process when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistributedEnv()
    return DistributedEnv(rank=dist.get_rank(), world_size=dist.get_world_size(),
                          local_rank=_env_int("LOCAL_RANK", 0), backend=str(dist.get_backend()))


def destroy_distributed() -> None:
    """Leave the process group (no-op without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main_process() -> bool:
    """True on rank 0, and in a single process: the one process that writes files and prints."""
    return not _active() or dist.get_rank() == 0


def print_main(*args: Any, **kwargs: Any) -> None:
    """print() on rank 0 only."""
    if is_main_process():
        print(*args, **kwargs)


def barrier() -> None:
    if _active():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s value of a picklable object on every rank (e.g. a run folder named by a clock).
    Only for objects this program created itself: never for data read from files."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _collective_device() -> torch.device:
    # NCCL reduces CUDA tensors only; gloo reduces CPU tensors.
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sums(values: dict[str, float]) -> dict[str, float]:
    """Sum each value over all ranks (in float64, so counts stay exact). Metrics are reduced as sums
    (loss x samples, correct predictions, samples) and divided afterwards, never averaged as ratios."""
    if not _active() or not values:
        return {k: float(v) for k, v in values.items()}
    keys = list(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return dict(zip(keys, t.cpu().tolist()))


def all_reduce_max(value: float) -> float:
    """The largest of one number over all ranks (e.g. peak memory)."""
    if not _active():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


# -- the rank's slice of each global batch ------------------------------------------------------------------
def rank_slice(global_size: int, rank: int, world_size: int) -> slice:
    """Contiguous slice of a global batch of `global_size` samples that rank `rank` trains on. Sizes differ
    by at most one (the first ranks take the remainder); together the slices cover the batch in order."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    if global_size < world_size:
        raise ValueError(f"a global batch of {global_size} sample(s) cannot be split over {world_size} "
                         f"processes; use a batch size of at least {world_size}")
    base, extra = divmod(global_size, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def loss_scale(local_size: int, global_size: int, world_size: int) -> float:
    """Factor on a rank's mean loss over its slice such that the mean over ranks of the scaled losses (what
    gradient averaging in DDP/FSDP computes) equals the mean loss over the global batch:
    mean_r(scale_r * mean_r) = sum_r(local_r * mean_r) / global_size."""
    return world_size * local_size / global_size


class RankSliceBatchSampler:
    """Wraps a sampler of global batches (lists of sample indices) and yields this rank's slice of each.
    Every rank must wrap the same global sampler (same seed) so that the slices tile each batch."""

    def __init__(self, global_batches: Iterable[Sequence[int]], rank: int, world_size: int):
        self.global_batches, self.rank, self.world_size = global_batches, rank, world_size

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches:
            yield list(batch[rank_slice(len(batch), self.rank, self.world_size)])

    def __len__(self) -> int:
        return len(self.global_batches)  # type: ignore[arg-type]


# -- synchronized BatchNorm ----------------------------------------------------------------------------------
class _SyncBatchNormFunction(torch.autograd.Function):
    """Batch normalisation over the samples of all ranks, for any device and backend.

    Forward: per-channel (count, mean, M2) of each rank are gathered and combined (Chan et al.'s parallel
    variance, which does not cancel catastrophically like E[x^2] - E[x]^2). Backward: the per-channel sums of
    dy and dy * x_hat are summed over ranks, because every sample's normalisation depends on every rank's batch.
    x: (B, C, *), channels at dim 1; weight, bias: (C,).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps, group):  # type: ignore[override]
        dims = [0] + list(range(2, x.ndim))
        shape = [1, -1] + [1] * (x.ndim - 2)
        xf = x.float()
        count = torch.full((x.shape[1],), x.numel() // x.shape[1], dtype=torch.float32, device=x.device)
        var_local, mean_local = torch.var_mean(xf, dim=dims, correction=0)
        stats = torch.stack([count, mean_local, var_local * count])  # (3, C)
        world = dist.get_world_size(group)
        gathered = [torch.empty_like(stats) for _ in range(world)]
        dist.all_gather(gathered, stats.contiguous(), group=group)
        counts, means, m2s = torch.stack(gathered).unbind(1)  # each (world, C)
        total = counts.sum(0)
        mean = (counts * means).sum(0) / total
        m2 = (m2s + counts * (means - mean) ** 2).sum(0)
        var = m2 / total
        invstd = torch.rsqrt(var + eps)
        x_hat = (xf - mean.view(shape)) * invstd.view(shape)
        y = x_hat
        if weight is not None:
            y = y * weight.float().view(shape) + bias.float().view(shape)
        ctx.save_for_backward(x_hat, weight, invstd, total)
        ctx.group = group
        ctx.input_dtype = x.dtype
        return y.to(x.dtype), mean, var, total

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar, _dtotal):  # type: ignore[override]
        x_hat, weight, invstd, total = ctx.saved_tensors
        dims = [0] + list(range(2, dy.ndim))
        shape = [1, -1] + [1] * (dy.ndim - 2)
        dyf = dy.float()
        sum_dy = dyf.sum(dims)
        sum_dy_xhat = (dyf * x_hat).sum(dims)
        dweight = dbias = None
        if weight is not None:
            dweight, dbias = sum_dy_xhat.to(weight.dtype), sum_dy.to(weight.dtype)
        sums = torch.stack([sum_dy, sum_dy_xhat])
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=ctx.group)
        g_dy, g_dy_xhat = sums[0] / total, sums[1] / total
        scale = invstd if weight is None else invstd * weight.float()
        dx = (dyf - g_dy.view(shape) - x_hat * g_dy_xhat.view(shape)) * scale.view(shape)
        return dx.to(ctx.input_dtype), dweight, dbias, None, None


def _in_backward() -> bool:
    """True while autograd runs a backward pass: a forward then is activation checkpointing recomputing a
    block, which must not update BatchNorm's running statistics a second time."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


class SyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch over all ranks.

    Unlike torch.nn.SyncBatchNorm this runs on any device and backend (gloo on CPU included), and DDP accepts
    it on CPU. It is written with plain tensor ops, so on GPU it costs a little more than torch's fused kernel;
    CoAtNet's BatchNorms sit in the stem and MBConv stages only. Outside a process group, or in eval mode, it
    is nn.BatchNorm2d. Input (B, C, H, W); state-dict keys are BatchNorm2d's, so checkpoints move freely
    between synchronized and plain models. Under activation checkpointing the running statistics are updated
    once per step (nn.BatchNorm2d updates them again when its block is recomputed).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        recomputing = self.training and _in_backward()
        if not (self.training and _active()):
            if recomputing and self.running_mean is not None:
                # the running statistics were updated in the forward pass: let this pass update copies
                return F.batch_norm(x, self.running_mean.clone(), self.running_var.clone(), self.weight,
                                    self.bias, True, 0.0, self.eps)
            return super().forward(x)
        self._check_input_dim(x)
        group = dist.group.WORLD
        y, mean, var, total = _SyncBatchNormFunction.apply(x, self.weight, self.bias, self.eps, group)
        if self.track_running_stats and self.running_mean is not None and not recomputing:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = (1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum)
                unbiased = var * (total / (total - 1).clamp(min=1))
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        return y


class SyncBatchNormChannelsLast(SyncBatchNorm):
    """SyncBatchNorm over the last axis of (B, H, W, C): the synchronized form of BatchNormChannelsLast."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d of `model` (in place) by a SyncBatchNorm of the same layout, keeping its
    parameters, statistics and state-dict keys. LayerNorm (the Transformer blocks) needs no synchronization."""
    from ..models.blocks import BatchNormChannelsLast

    for name, child in list(model.named_children()):
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, SyncBatchNorm):
            cls = SyncBatchNormChannelsLast if isinstance(child, BatchNormChannelsLast) else SyncBatchNorm
            new = cls(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            like = child.weight if child.affine else child.running_mean
            if like is not None:
                new.to(device=like.device, dtype=like.dtype)
            new.load_state_dict(child.state_dict())
            new.train(child.training)
            setattr(model, name, new)
        else:
            convert_sync_batchnorm(child)
    return model


# -- wrapping for data parallelism ---------------------------------------------------------------------------
def broadcast_module_state(model: nn.Module, src: int = 0) -> None:
    """Copy rank `src`'s parameters and buffers to every rank, so all ranks start from the same weights."""
    if not _active():
        return
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=src)


def wrap_ddp(model: nn.Module, env: DistributedEnv) -> nn.Module:
    """DistributedDataParallel around `model` (already on its device); the model itself in one process."""
    if not env.is_distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def apply_fsdp(model: nn.Module, env: DistributedEnv, grad_checkpointing: bool = True,
               param_dtype: torch.dtype | None = None) -> nn.Module:
    """Shard `model` (a CoAtNet, already on its device) with FSDP2 `fully_shard`: one unit per block, so
    only one block's full weights exist at a time, and the root unit for stem, final norm and head.
    Parameters become DTensors sharded over ranks along dim 0; gradients are reduce-scattered in float32.
    `grad_checkpointing` recomputes each block's activations in backward (CoAtNet.set_grad_checkpointing).
    `param_dtype` (e.g. torch.bfloat16) is the dtype of the gathered weights for compute; the sharded
    master weights and optimizer states stay float32. Works with one process too (a group of one)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("FSDP needs a process group: launch with torchrun (one process is fine: "
                           "torchrun --nproc-per-node 1)")
    broadcast_module_state(model)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for stage in model.stages:
        for block in stage.blocks:
            fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The CoAtNet inside a DDP wrapper (FSDP2 shards in place and needs no unwrapping)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on CPU. With FSDP this is a collective: every rank must call it, and
    only rank 0 receives the tensors (the others get an empty dict)."""
    model = unwrap(model)
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state with whole (unsharded) tensors on CPU, keyed like `optimizer.state_dict()`
    with parameter names instead of indices. Collective under FSDP (only rank 0 receives the tensors)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(unwrap(model), optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model: nn.Module, model_state: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer | None = None, optimizer_state: dict | None = None) -> None:
    """Load whole (unsharded) states, as written by a run with any number of processes, into a model that
    may be sharded differently. Every rank passes the full states (each reads the checkpoint file)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    model = unwrap(model)
    options = StateDictOptions(full_state_dict=True, strict=True)
    if is_sharded(model):
        set_model_state_dict(model, model_state, options=options)
    else:
        model.load_state_dict(model_state, strict=True)
    if optimizer is not None and optimizer_state is not None:
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
