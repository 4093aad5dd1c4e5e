"""Data parallelism: the model wrapped for DDP, or sharded in place with FSDP2, and its whole (unsharded)
model and optimizer states, gathered for a checkpoint and loaded back into any sharding.

One format for whole states, whatever the number of processes or the sharding: the model's state dict,
and `optimizer.state_dict()`'s (states keyed by parameter position) with whole tensors on CPU. Checkpoints
hold exactly that (train/checkpoint.py), so a run resumes with another number of processes, or with DDP
instead of FSDP.

torch.distributed's FSDP, DTensor and state-dict modules are imported inside the functions that need them:
importing them costs about a second, and only FSDP runs use them.
"""
from __future__ import annotations

import contextlib
import inspect
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ...process_group import is_active
from .sync_batchnorm import convert_sync_batchnorm


def broadcast_module_state(model: nn.Module, src: int = 0) -> None:
    """Copy rank `src`'s parameters and buffers to every rank, so all ranks start from the same weights."""
    if not is_active():
        return
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=src)


def wrap_ddp(model: nn.Module) -> nn.Module:
    """DistributedDataParallel around `model` (already on its device); the model itself in one process.
    DDP copies rank 0's weights to every rank when it is built and averages gradients in backward."""
    if not is_active():
        return model
    device = next(model.parameters()).device
    # No buffer broadcast: with SyncBatchNorm the running statistics agree on every rank already, and
    # evaluation may run a different number of forwards per rank.
    no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
               inspect.signature(DistributedDataParallel).parameters else {"broadcast_buffers": False})
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None, **no_sync)


def wrap_model(model: nn.Module, sync_batchnorm: bool = True) -> nn.Module:
    """The module to train with: in one process `model` itself; across processes DDP around it, with its
    BatchNorms synchronized (in place, keeping its parameters) unless `sync_batchnorm` is False."""
    if not is_active():
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


def gradient_sync(net: nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
    """The context of one micro-batch's backward: under DDP, `no_sync()` unless `enabled`, so that the
    gradients of a step's micro-batches accumulate locally and are averaged over processes once, in the last
    micro-batch's backward (the same sums: averaging is linear). `net` may be the compiled DDP module.
    Anything else (one process, FSDP) reduces as it always does."""
    ddp = getattr(net, "_orig_mod", net)  # torch.compile's wrapper keeps the module as _orig_mod
    if enabled or not isinstance(ddp, DistributedDataParallel):
        return contextlib.nullcontext()
    return ddp.no_sync()


def unwrap(model: nn.Module) -> nn.Module:
    """The CoAtNet inside a DDP wrapper (FSDP2 shards in place and needs no unwrapping)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def _dtensor_class():
    """torch's DTensor class, or None while torch.distributed.tensor is not imported: then no tensor can be
    one, and this process has not paid for the import."""
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


def is_sharded(model: nn.Module) -> bool:
    """True when `model`'s parameters are FSDP2 shards (DTensors)."""
    dtensor = _dtensor_class()
    return dtensor is not None and any(isinstance(p, dtensor) for p in model.parameters())


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on CPU. With FSDP this is a collective: every rank must call it, and
    only rank 0 receives the tensors (the others get an empty dict)."""
    model = unwrap(model)
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def full_optimizer_state_dict(optimizer: torch.optim.Optimizer) -> dict:
    """`optimizer.state_dict()` with whole tensors on CPU (its format: states keyed by parameter position).
    Collective when the parameters are sharded: every rank calls it, every rank receives the tensors."""
    dtensor = _dtensor_class()
    sd = optimizer.state_dict()
    state = {pid: {k: (v.full_tensor() if dtensor is not None and isinstance(v, dtensor) else v).detach().cpu()
                   if isinstance(v, torch.Tensor) else v for k, v in st.items()}
             for pid, st in sd["state"].items()}
    return {"state": state, "param_groups": sd["param_groups"]}


def shard_optimizer_state_dict(optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
    """The inverse of `full_optimizer_state_dict` for this optimizer's parameters: each whole state tensor
    shaped like its (sharded) parameter becomes this rank's shard, ready for `optimizer.load_state_dict`."""
    dtensor = _dtensor_class()
    if dtensor is None:  # no sharded parameters: the whole tensors are this rank's
        return state_dict
    from torch.distributed.tensor import distribute_tensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for pid, st in state_dict["state"].items():
        p = params[int(pid)]
        state[pid] = {k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
                      if isinstance(p, dtensor) and isinstance(v, torch.Tensor) and v.shape == p.shape else v
                      for k, v in st.items()}
    return {"state": state, "param_groups": state_dict["param_groups"]}


def load_full_state(model: nn.Module, model_state: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer | None = None, optimizer_state: dict | None = None) -> None:
    """Load whole (unsharded) states, as `full_model_state` and `full_optimizer_state_dict` give them (what a
    checkpoint of a run with any number of processes holds), into a model and its optimizer that may be
    sharded differently. Every rank passes the full states (each reads the checkpoint file)."""
    model = unwrap(model)
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, model_state, options=StateDictOptions(full_state_dict=True, strict=True))
    else:
        model.load_state_dict(model_state, strict=True)
    if optimizer is not None and optimizer_state is not None:
        optimizer.load_state_dict(shard_optimizer_state_dict(optimizer, optimizer_state))
