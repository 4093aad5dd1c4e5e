"""Re-estimating BatchNorm running statistics at a new input size, without labels or weight changes.

A model trained at one resolution and evaluated at another normalises with running means and variances
measured at the training size, while its activations at the new size have other statistics (objects
appear larger, maps are bigger, attention mixes more tokens). Re-measuring the statistics on a few
hundred training images at the new size, through the eval transform, removes that mismatch ("BN
recalibration"; cf. FixRes, Touvron et al. 2019, which fine-tunes the BatchNorms and the classifier at
the test resolution, and "precise BN" of Wu & Johnson 2021, which averages statistics over many batches).
"""
from __future__ import annotations

import torch
from torch import nn

from ..data.datasets import DataSpec
from ..data.transforms import normalize
from .distributed import SyncBatchNorm, rank_and_world, shard
from .runtime import Runtime


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of `model` that keep running statistics."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, source, indices: torch.Tensor, spec: DataSpec, runtime: Runtime,
                          batch_size: int = 100, workers: int = 0, strict: bool = False) -> int:
    """Replace the running mean and variance of every BatchNorm of `model` by their average over the
    batches of source[indices] (images (B, C, S, S) at S = spec.img_size, eval transform, normalised by
    spec): a cumulative average of the per-batch statistics, equal weight per batch. Every other layer
    runs in eval mode (no stochastic depth), no weight changes, labels are not read. A BatchNorm that
    saw no batch in training mode (off the forward path, or held in eval mode by a hook such as frozen
    stages') keeps its previous statistics, and so does every one when the pass fails. Returns the
    number of images used (by this rank, under synchronized data parallelism)."""
    layers = batchnorm_layers(model)
    if not layers or len(indices) == 0:
        return 0
    modes = {m: m.training for m in model.modules()}
    saved = {m: (m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for m in layers}
    model.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
        m.train()
    # Under data parallelism with synchronized BatchNorm each rank measures its share of every batch and the
    # layers combine the shares: the statistics one process measures on the whole batches, at 1/world the cost.
    rank, world = rank_and_world()
    synced = world > 1 and any(isinstance(m, (SyncBatchNorm, nn.SyncBatchNorm)) for m in layers)
    batches = [shard(b, rank, world) if synced else b for b in indices.split(batch_size)]
    n, completed = 0, False
    try:
        for batch in source.batches(batches, spec, workers=workers, strict=strict, device=runtime.device):
            if len(batch.labels) == 0 and not synced:  # a synchronized rank takes part even with no images
                continue
            with runtime.autocast():
                model(normalize(runtime.inputs(batch.images), spec.mean, spec.std))
            n += len(batch.labels)
        completed = True
    finally:
        for m, (momentum, mean, var, tracked) in saved.items():
            m.momentum = momentum
            if not completed or int(m.num_batches_tracked) == 0:  # interrupted, or never updated: as before
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
            m.num_batches_tracked.copy_(tracked)  # the step counter is training's, not ours
        for m, training in modes.items():
            m.training = training
    return n
