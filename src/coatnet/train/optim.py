"""AdamW with weight decay only on weight matrices and kernels, and an EMA of the weights."""
from __future__ import annotations

import torch
from torch import nn

from ..device_plan import device_plan
from ..models.transfer import layer_decay_groups
from .redundant import redundant_parameters


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed weights, and the model's `no_weight_decay()` names (norms, biases, relative
    bias tables; any 1-d parameter when the model has no such method) with weight_decay 0. The model's
    redundant parameters (gradient zero in exact arithmetic: train/redundant.py) are left out."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    redundant = redundant_parameters(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or name in redundant:  # redundant: their gradient is only roundoff
            continue
        (no_decay if name in skip or p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.999),
                    layer_decay: float = 1.0) -> torch.optim.AdamW:
    """AdamW over the trainable parameters. With layer_decay < 1 the groups carry an "lr_scale" per
    depth (models.transfer.layer_decay_groups); the engine multiplies the scheduled lr by it."""
    # torch's fused AdamW kernel where the device plan has it (CUDA and CPU): one pass over each tensor instead
    # of a dozen foreach ops, a third of the optimizer's time on the small CPU models; other devices take the
    # foreach path. FSDP's sharded parameters (DTensors) keep the foreach path.
    fused = all(device_plan(p.device.type).fused_optimizer and type(p.data) is torch.Tensor
                for p in model.parameters())
    if layer_decay != 1.0:
        groups = layer_decay_groups(model, weight_decay, layer_decay)
    else:
        groups = param_groups(model, weight_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas),
                             **({"fused": True} if fused else {"foreach": True}))


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer.step()` can be told to skip on the device (`step(optimizer, skip=...)`): torch's fused
    AdamW reads a `found_inf` tensor, as torch.amp.GradScaler uses it, and leaves parameters, moments and step
    counts untouched where it is 1, without the host reading it. The foreach path cannot. Asked of the groups,
    not the defaults: a loaded state dict brings its groups' settings (a checkpoint of an FSDP run: foreach)."""
    return all(group.get("fused") for group in optimizer.param_groups)


def step(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """optimizer.step(), skipped on the device where `skip` (a 0/1 float tensor) is 1 (needs
    `skips_on_device(optimizer)`)."""
    optimizer.found_inf = skip
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf


class WeightEMA:
    """Exponential moving average of a model's parameters and buffers: ema <- d * ema + (1 - d) * w.
    Buffers (BatchNorm statistics) are copied, not averaged. With `warmup`, d at step t is
    min(decay, (1 + t) / (10 + t)) (TensorFlow's ExponentialMovingAverage with num_updates): 0.1 at the first
    step, 0.9 at the 81st, so the average of a run of a few hundred steps is of its later weights, not of the
    weights it started from (0.9999 keeps 99.9% of them after 10 steps)."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False):
        self.decay, self.warmup = decay, warmup
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def decay_at(self, step: int) -> float:
        """The decay applied by the update of optimizer step `step` (0-based)."""
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int = 0, skip: torch.Tensor | None = None) -> None:
        """One update with the decay of optimizer step `step` (decay_at); none where `skip` (a 0/1 float tensor on
        the device, see `step`) is 1."""
        params = dict(model.named_parameters())
        decay = self.decay_at(step)
        weight = (1 - decay) if skip is None else (1 - decay) * (1 - skip)
        for k, v in model.state_dict().items():
            if k in params and v.is_floating_point():
                self.state[k].lerp_(v.detach(), weight if skip is None else weight.to(v.dtype))
            elif skip is None:
                self.state[k].copy_(v)
            else:
                self.state[k].copy_(torch.where(skip.to(torch.bool), self.state[k], v))
