"""The run's data: which images train and validate (`RunData`, `load_data`), one epoch's order of them as this
process's micro-batches (`EpochData`, `epoch_data`), and how a decoded batch becomes model inputs on the
training device (`train_inputs`).

Every random choice is a function of (seed, epoch, sample index): the epoch's permutation, the augmentation
of each sample, Mixup's pairs. A run resumed from any checkpoint, or trained by another number of processes,
sees the same inputs.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator

import torch

from ..data import build_data
from ..data.datasets import Batch, DataSpec
from ..data.random import permutation
from ..data.transforms import (AugmentConfig, mix_batch, mix_params, normalize, rand_augment, random_erase,
                               to_unit_range)
from ..models import get_config
from ..models.pretrained import weights_of
from .config import TrainConfig
from .distributed import rank_and_world, shard, split_micro_batches
from .evaluate import subset_indices
from .messages import note, warn
from .runtime import Runtime

HOST = Runtime(torch.device("cpu"), "fp32", channels_last=False, compile=False)


@dataclass(frozen=True)
class RunData:
    """The run's images: training and validation sources, the (seeded subset) indices used from each."""

    train_src: object
    val_src: object
    spec: DataSpec
    train_idx: torch.Tensor
    val_idx: torch.Tensor
    workers: int  # DataLoader worker processes for folders
    repeats: int = 1  # passes over train_idx per epoch (cfg.min_epoch_images)

    @property
    def epoch_images(self) -> int:
        return len(self.train_idx) * self.repeats


@dataclass
class EpochData:
    """This process's share of one epoch: the epoch's global batches (the first `start` already trained, on
    a resume) as this process's micro-batches, read lazily, and how a micro-batch becomes model inputs."""

    epoch: int  # 0-based
    batch_sizes: list[int]  # images per global batch (all processes together), for every batch of the epoch
    micro_counts: list[int]  # this process's micro-batches per global batch (the same on every process)
    start: int  # global batches trained before (a resumed epoch)
    batches: Iterator[Batch]  # the micro-batches of global batches start, start + 1, ...
    # -> (images (B, C, S, S), soft targets (B, classes), labels (B,)), all on the training device
    inputs: Callable[[Batch], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def augment_config(cfg: TrainConfig) -> AugmentConfig:
    """The training augmentation `cfg` asks for."""
    return AugmentConfig(enabled=cfg.augment, crop_scale=tuple(cfg.crop_scale), hflip=cfg.hflip,
                         translate=cfg.translate, randaugment_n=cfg.randaugment_n, randaugment_m=cfg.randaugment_m,
                         mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                         erase_prob=cfg.random_erase)


def load_data(cfg: TrainConfig) -> tuple[TrainConfig, RunData]:
    """The run's data, and `cfg` with img_size and crop_fraction resolved from it."""
    stride = get_config(cfg.model, **cfg.model_overrides()).reduction
    train_src, val_src, spec = build_data(cfg.data, cfg.data_dir, cfg.val_fraction, cfg.img_size,
                                          cfg.crop_fraction, cfg.seed, size_multiple=stride)
    _note_size(cfg, spec, stride)
    spec = _published_preprocessing(cfg, spec)
    cfg = cfg.replace(img_size=spec.img_size, crop_fraction=spec.crop_fraction)
    cfg.check_translate(cfg.img_size)
    workers = min(4, os.cpu_count() or 1) if cfg.workers is None else cfg.workers
    train_idx = subset_indices(len(train_src), cfg.train_subset, cfg.seed, stream=1)
    val_idx = subset_indices(len(val_src), cfg.val_subset, cfg.seed, stream=2)
    for flag, asked, have, split in (("--train-subset", cfg.train_subset, len(train_src), "training"),
                                     ("--val-subset", cfg.val_subset, len(val_src), "validation")):
        if asked is not None and asked > have:
            warn(f"warning: {flag} {asked} is more than the {have} {split} images of {cfg.data}: using all {have}")
    if len(val_idx) == 0:
        raise ValueError(f"{cfg.data}: no validation images (raise --val-fraction or add a val/ folder)")
    repeats = 1
    if cfg.min_epoch_images and len(train_idx) and not getattr(train_src, "streams", False):
        repeats = math.ceil(cfg.min_epoch_images / len(train_idx))  # a stream is read as it comes: never repeated
    return cfg, RunData(train_src, val_src, spec, train_idx, val_idx, workers, repeats)


def _note_size(cfg: TrainConfig, spec: DataSpec, stride: int) -> None:
    """Say where a folder's input size came from, and what an upscaling of more than 2x costs."""
    side, size = spec.image_side, spec.img_size
    if cfg.img_size is None and spec.name != "fashion-mnist" and side:
        note(f"img_size {size}: the training images' median side ({side} px) rounded to a multiple of {stride}, "
             f"the sides {cfg.model} takes (--img-size sets another)", cfg.quiet)
    if side and size > 2 * side:
        note(f"note: img_size {size} upscales the images {size / side:.1f}x (median side {side} px): about "
             f"{(size / side) ** 2:.0f}x the multiply-adds per image of a size near theirs", cfg.quiet)


def _published_preprocessing(cfg: TrainConfig, spec: DataSpec) -> DataSpec:
    """Starting from published weights (a tag, or a file named after one) on RGB images: normalise with
    the mean and std they were trained with, and (unless --crop-fraction is given) evaluate with their
    centre crop. Recorded in the checkpoint's data spec, so eval and predict use the same."""
    published = weights_of(cfg.pretrained)
    if published is None or spec.in_chans != 3:
        return spec
    crop = spec.crop_fraction if cfg.crop_fraction is not None else published.crop_pct
    if (spec.mean, spec.std, spec.crop_fraction) != (published.mean, published.std, crop):
        note(f"preprocessing of {published.tag}: mean {published.mean}, std {published.std}, eval crop {crop}",
             cfg.quiet)
    return dataclasses.replace(spec, mean=published.mean, std=published.std, crop_fraction=crop)


def epoch_data(cfg: TrainConfig, data: RunData, epoch: int, start: int, runtime: Runtime = HOST) -> EpochData:
    """Epoch `epoch`'s global batches (a permutation of the training indices, a function of seed and epoch;
    with data.repeats > 1 that many permutations, each repeat r's indices shifted by r * len(source) so that
    its augmentation is drawn anew, see data/datasets.py) as this process's micro-batches, from global batch
    `start` on, made into inputs on `runtime`'s device."""
    rank, world = rank_and_world()
    n, k = len(data.train_idx), data.repeats
    order = torch.cat([data.train_idx[permutation(cfg.seed, epoch * k + r, n)] + r * len(data.train_src)
                       for r in range(k)])
    global_batches = list(order.split(cfg.batch_size))
    micro = cfg.micro_batch_size or cfg.batch_size  # per-process images per forward/backward
    parts = [split_micro_batches(shard(gb, rank, world), len(gb), world, micro) for gb in global_batches]
    # A streaming source (shards) reads this process's own stream: on resume, skip what it already read.
    skip = ({"skip": sum(len(shard(gb, rank, world)) for gb in global_batches[:start])}
            if getattr(data.train_src, "streams", False) else {})
    aug = augment_config(cfg)
    batches = data.train_src.batches([m for p in parts[start:] for m in p], data.spec, train=True, aug=aug,
                                     seed=cfg.seed, epoch=epoch, workers=data.workers, strict=cfg.strict,
                                     device=runtime.device, **skip)
    inputs = partial(train_inputs, aug=aug, spec=data.spec, num_classes=len(data.spec.classes), seed=cfg.seed,
                     epoch=epoch, runtime=runtime)
    return EpochData(epoch, [len(gb) for gb in global_batches], [len(p) for p in parts], start, batches, inputs)


def train_inputs(batch: Batch, aug: AugmentConfig, spec: DataSpec, num_classes: int, seed: int, epoch: int,
                 runtime: Runtime) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A decoded batch -> (normalised images (B, C, S, S), soft targets (B, classes), labels (B,)) on the
    device. The uint8 images cross first; RandAugment, normalisation, random erasing and Mixup/CutMix run on the
    device. The Mixup draws are made here on the host from the sample indices, before the copy (nothing is read
    back); the indices cross once, for RandAugment's and random erasing's draws."""
    mixing = aug if aug.enabled else AugmentConfig(enabled=False, label_smoothing=aug.label_smoothing)
    params = mix_params(seed, epoch, batch.indices, mixing, spec.img_size, spec.img_size)
    x, labels = runtime.to_device(batch.images), runtime.to_device(batch.labels)
    # uint8 images become a new float tensor here, which the steps below may then change in place; float
    # images may be the data set's own memory (on a CPU the copy to the device is the tensor itself).
    owned = x.dtype == torch.uint8
    x = to_unit_range(x)
    index = runtime.to_device(batch.indices)
    if aug.enabled and aug.randaugment_n > 0:
        x = rand_augment(x, seed, epoch, index, aug.randaugment_n, aug.randaugment_m, inplace=owned)
        owned = True
    x = normalize(x, spec.mean, spec.std, inplace=owned)
    if aug.enabled:
        x = random_erase(x, seed, epoch, index, aug)
    x, targets = mix_batch(x, labels, num_classes, seed, epoch, batch.indices, mixing, params)
    return runtime.inputs(x), targets, labels
