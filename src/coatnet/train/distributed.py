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

import atexit
import datetime
import os
from dataclasses import dataclass
from typing import Any

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
    backend = "gloo"
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local_rank} but this machine has {torch.cuda.device_count()} GPU(s); "
                             f"use --nproc-per-node {torch.cuda.device_count()} or fewer")
        torch.cuda.set_device(local_rank)
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    atexit.register(destroy_distributed)
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


def destroy_distributed() -> None:
    """Leave the process group (no-op without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main() -> bool:
    """True on rank 0, and in a single process: the one process that writes files and prints."""
    return not _active() or dist.get_rank() == 0


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


def all_reduce_sums(values: list[float] | dict[str, float]) -> list[float] | dict[str, float]:
    """Sum each value over all ranks (in float64 on CPU, so counts stay exact); a list or a dict of floats
    in, the same out. Metrics are reduced as sums (loss x samples, correct predictions, samples) and divided
    afterwards, never averaged as ratios."""
    keys = list(values) if isinstance(values, dict) else None
    flat = [float(values[k]) for k in keys] if keys is not None else [float(v) for v in values]
    if _active() and flat:
        t = torch.tensor(flat, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        flat = t.tolist()
    return dict(zip(keys, flat)) if keys is not None else flat


# -- the rank's slice of each global batch ------------------------------------------------------------------
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


def local_threads() -> int:
    """CPU threads for this process: the machine's cores shared by the processes torchrun started on it."""
    return max(1, (os.cpu_count() or 1) // max(1, _env_int("LOCAL_WORLD_SIZE", 1)))


def loss_scale(local_size: int, global_size: int, world_size: int) -> float:
    """Factor on a rank's mean loss over its slice such that the mean over ranks of the scaled losses (what
    gradient averaging in DDP/FSDP computes) equals the mean loss over the global batch:
    mean_r(scale_r * mean_r) = sum_r(local_r * mean_r) / global_size."""
    return world_size * local_size / global_size


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
        if x.numel() > 0:
            var_local, mean_local = torch.var_mean(xf, dim=dims, correction=0)
        else:  # a rank with no samples this step contributes nothing (not NaN)
            var_local = mean_local = torch.zeros(x.shape[1], dtype=torch.float32, device=x.device)
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
    """Replace every BatchNorm2d of `model` (in place) by a SyncBatchNorm of the same layout. The new layers
    hold the very same Parameter and buffer objects, so an optimizer built before the conversion still
    updates them, and state-dict keys do not change. LayerNorm (the Transformer blocks) needs no
    synchronization."""
    from ..models.blocks import BatchNormChannelsLast

    for name, child in list(model.named_children()):
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, SyncBatchNorm):
            cls = SyncBatchNormChannelsLast if isinstance(child, BatchNormChannelsLast) else SyncBatchNorm
            new = cls(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats,
                      device="meta")
            new._parameters, new._buffers = child._parameters, child._buffers
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


def wrap_ddp(model: nn.Module) -> nn.Module:
    """DistributedDataParallel around `model` (already on its device); the model itself in one process.
    DDP copies rank 0's weights to every rank when it is built and averages gradients in backward."""
    if not _active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    # No buffer broadcast: with SyncBatchNorm the running statistics agree on every rank already, and
    # evaluation may run a different number of forwards per rank.
    import inspect

    no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
               inspect.signature(DistributedDataParallel).parameters else {"broadcast_buffers": False})
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None, **no_sync)


def wrap_model(model: nn.Module, sync_batchnorm: bool = True) -> nn.Module:
    """The module to train with: in one process `model` itself; across processes DDP around it, with its
    BatchNorms synchronized (in place, keeping its parameters) unless `sync_batchnorm` is False."""
    if not _active():
        return model
    if sync_batchnorm:
        convert_sync_batchnorm(model)
    return wrap_ddp(model)


def apply_fsdp(model: nn.Module, grad_checkpointing: bool = True,
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


def full_optimizer_state_dict(optimizer: torch.optim.Optimizer) -> dict:
    """`optimizer.state_dict()` with whole tensors on CPU (its format: states keyed by parameter position).
    Collective when the parameters are sharded: every rank calls it, every rank receives the tensors."""
    from torch.distributed.tensor import DTensor

    sd = optimizer.state_dict()
    state = {pid: {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu()
                   if isinstance(v, torch.Tensor) else v for k, v in st.items()}
             for pid, st in sd["state"].items()}
    return {"state": state, "param_groups": sd["param_groups"]}


def shard_optimizer_state_dict(optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
    """The inverse of `full_optimizer_state_dict` for this optimizer's parameters: each whole state tensor
    shaped like its (sharded) parameter becomes this rank's shard, ready for `optimizer.load_state_dict`."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for pid, st in state_dict["state"].items():
        p = params[int(pid)]
        state[pid] = {k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
                      if isinstance(p, DTensor) and isinstance(v, torch.Tensor) and v.shape == p.shape else v
                      for k, v in st.items()}
    return {"state": state, "param_groups": state_dict["param_groups"]}


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
