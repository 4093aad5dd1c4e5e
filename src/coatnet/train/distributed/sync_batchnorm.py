"""BatchNorm over the samples of all ranks (the global batch), and the module swap that puts it into a model
in place. Which one is the device plan's (coatnet.device_plan): on CUDA torch's nn.SyncBatchNorm (its fused
kernels, NCCL), elsewhere ours (plain tensor ops: any device and backend, gloo on CPU included)."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ...device_plan import SYNC_BATCHNORM_KINDS, device_plan
from ...models.blocks import BatchNormChannelsLast
from ...process_group import is_active


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
        if not (self.training and is_active()):
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


class TorchSyncBatchNorm(nn.SyncBatchNorm):
    """torch's nn.SyncBatchNorm (fused CUDA kernels, statistics gathered over NCCL) with what ours adds:
    BatchNorm2d's state-dict keys (it has them already), and running statistics updated once per step
    when activation checkpointing recomputes the block (torch's would update them a second time)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.track_running_stats and self.running_mean is not None and _in_backward()):
            return super().forward(x)
        kept = self.running_mean, self.running_var, self.num_batches_tracked
        self.running_mean, self.running_var, self.num_batches_tracked = (t.clone() for t in kept)
        try:  # the recomputation updates copies, then the statistics of the forward pass are put back
            return super().forward(x)
        finally:
            self.running_mean, self.running_var, self.num_batches_tracked = kept


class TorchSyncBatchNormChannelsLast(TorchSyncBatchNorm):
    """TorchSyncBatchNorm over the last axis of (B, H, W, C): the form of BatchNormChannelsLast."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


_SYNC_CLASSES = {"coatnet": (SyncBatchNorm, SyncBatchNormChannelsLast),
                 "torch": (TorchSyncBatchNorm, TorchSyncBatchNormChannelsLast)}


def convert_sync_batchnorm(model: nn.Module, kind: str | None = None) -> nn.Module:
    """Replace every BatchNorm2d of `model` (in place) by a synchronized BatchNorm of the same layout: `kind`
    "torch" (TorchSyncBatchNorm) or "coatnet" (SyncBatchNorm); None: the device plan's for the device the
    model is on. The new layers hold the very same Parameter and buffer objects, so an optimizer built
    before the conversion still updates them, and state-dict keys do not change. LayerNorm (the Transformer
    blocks) needs no synchronization."""
    if kind is None:
        first = next(model.parameters(), None)
        kind = device_plan(first.device.type if first is not None else "cpu").sync_batchnorm
    if kind not in SYNC_BATCHNORM_KINDS:
        raise ValueError(f"synchronized BatchNorm kind {kind!r} is not one of {', '.join(SYNC_BATCHNORM_KINDS)}")
    plain, channels_last = _SYNC_CLASSES[kind]
    synced = (SyncBatchNorm, nn.SyncBatchNorm)
    for name, child in list(model.named_children()):
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, synced):
            cls = channels_last if isinstance(child, BatchNormChannelsLast) else plain
            new = cls(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats,
                      device="meta")
            new._parameters, new._buffers = child._parameters, child._buffers
            new.train(child.training)
            setattr(model, name, new)
        else:
            convert_sync_batchnorm(child, kind)
    return model
