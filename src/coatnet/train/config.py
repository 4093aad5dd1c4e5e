"""TrainConfig: every setting of a training run, as one frozen dataclass (saved as config.json).

This module loads no torch (nor anything of ours that does): `coatnet train --help` builds its flags from these
fields and defaults in a fraction of a second. Whether `model` names a registered variant is checked where the
registry is loaded: `train()`, `finetune_config` and the CLI, before anything is written."""
from __future__ import annotations

import dataclasses
import importlib.util
import typing
from dataclasses import dataclass
from typing import Any, Optional

from ..utils import data_folder_error, did_you_mean
from .schedule import SCHEDULES

TRACKERS = ("tensorboard", "wandb")


def parse_log(log: str | None) -> tuple[str, ...]:
    """"tensorboard", "wandb", "tensorboard,wandb" (or None) -> the trackers named; ValueError for unknown
    ones and for those whose package is not installed (before anything is written)."""
    kinds = tuple(k.strip() for k in (log or "").split(",") if k.strip())
    for kind in kinds:
        if kind not in TRACKERS:
            raise ValueError(f"log={log!r}: unknown tracker {kind!r}; use {' or '.join(TRACKERS)} (comma-separated "
                             f"for both)")
        if importlib.util.find_spec(kind) is None:
            raise ValueError(f"--log {kind} needs the {kind} package: pip install 'coatnet[{kind}]'")
    return kinds


def _is_a(value: Any, hint: Any) -> bool:
    """isinstance for the field types of TrainConfig: bool, int, float (an int is a float, a bool is neither a
    float nor an int), str, and tuple[X, ...]."""
    if typing.get_origin(hint) is tuple:
        items = typing.get_args(hint)
        return (isinstance(value, tuple) and len(value) == len(items)
                and all(_is_a(v, t) for v, t in zip(value, items)))
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


@dataclass(frozen=True)
class TrainConfig:
    """All settings of `coatnet.train.train`. The defaults are the `default` recipe (train/recipes.py):
    coatnet_micro on Fashion-MNIST, 92% test top-1 in under 10 minutes on 2 CPU cores."""

    # -- data --
    data: str = "fashion-mnist"  # "fashion-mnist" or an ImageFolder root (train/ and val/, or class folders)
    data_dir: Optional[str] = None  # Fashion-MNIST IDX folder (default /usr/share/datasets/fashion-mnist)
    val_fraction: float = 0.1  # share of each class held out when a folder has no train/ and val/
    train_subset: Optional[int] = None  # train on a seeded subset of this many images (None: all)
    val_subset: Optional[int] = None  # evaluate on a seeded subset of this many val images (None: all)
    img_size: Optional[int] = None  # input side, a multiple of the model's total stride (32; 8 for coatnet_micro)
    #                                 (None: 32 for Fashion-MNIST; for folders the images' median side, rounded)
    crop_fraction: Optional[float] = None  # eval centre crop (None: 1.0 for Fashion-MNIST, 0.875 for folders)
    workers: Optional[int] = None  # DataLoader worker processes for folders (None: min(4, CPUs))
    strict: bool = False  # fail on an unreadable image instead of skipping it (and naming it in the log)
    # -- model --
    model: str = "coatnet_micro"  # registered variant (coatnet.list_models())
    layout: Optional[str] = None  # block types of S1..S4 replacing the variant's, e.g. "C-T-T-T" (None: its own)
    drop_path: float = 0.0  # stochastic depth: maximum rate, reached at the last block
    pretrained: Optional[str] = None  # start from these weights (ours, timm's, or a tag): fine-tuning; a head
    #                                   for another class count is replaced, tables are resized to img_size
    layer_decay: float = 1.0  # layer-wise lr decay: block d of D (stem 0, head D) trains at lr * layer_decay^(D-d)
    freeze_stages: int = 0  # keep the stem and the first N built stages fixed (weights and BatchNorm statistics)
    eval_before: bool = False  # evaluate once before the first step (fine-tuning: the accuracy it starts from)
    recalibrate_bn: int = 0  # before the first step (and before freezing stages): re-estimate every BatchNorm's
    #                          running statistics on this many training images at img_size, eval transform,
    #                          no labels (train.recalibrate); 0: off
    # -- optimisation --
    epochs: int = 7  # passes over the training set (each of at least min_epoch_images images)
    min_epoch_images: int = 0  # a smaller training set is repeated within each epoch (each repeat reshuffled and
    #                            augmented anew) until the epoch holds at least this many images, so that `epochs`
    #                            gives enough optimizer steps at any data size; 0: one pass per epoch
    batch_size: int = 256  # global batch per optimizer step (all processes and accumulation together)
    micro_batch_size: Optional[int] = None  # images per forward/backward; smaller accumulates gradients
    lr: float = 3e-3  # peak learning rate (AdamW)
    min_lr: float = 1e-5  # floor the schedule decays to
    warmup_epochs: float = 0.3  # linear warmup from 0 (fractions of an epoch allowed)
    schedule: str = "cosine"  # after warmup: "cosine" or "linear" decay to min_lr, or "constant" (fine-tuning)
    weight_decay: float = 0.05  # AdamW decoupled decay; never on norms, biases, bias tables
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    clip_grad: Optional[float] = 1.0  # clip the global gradient norm to this (None: off)
    ema_decay: float = 0.0  # exponential moving average of weights per step (0: off); evaluation uses it
    ema_warmup: bool = False  # decay min(ema_decay, (1 + t) / (10 + t)) at step t (TensorFlow's num_updates rule):
    #                           the average follows the weights within a short run instead of holding the first ones
    # -- augmentation --
    augment: bool = True  # False: no random augmentation at all (train images get the eval transform)
    crop_scale: tuple[float, float] = (1.0, 1.0)  # random resized crop area range (paper/ImageNet: 0.08..1)
    hflip: float = 0.5  # horizontal flip probability
    randaugment_n: int = 0  # RandAugment ops per image (paper: 2); 0: off
    randaugment_m: float = 15.0  # RandAugment magnitude, 0..30 (paper: 15)
    mixup: float = 0.0  # Mixup Beta alpha (paper: 0.8); 0: off
    cutmix: float = 0.0  # CutMix Beta alpha; 0: off
    label_smoothing: float = 0.1  # (paper: 0.1)
    # -- runtime --
    precision: str = "auto"  # "fp32", "bf16" (autocast on CPU and GPU), or "auto": bf16 where the hardware has it
    #                          natively (CUDA; CPUs with AVX512-BF16 or AMX), fp32 elsewhere (train.runtime)
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
    channels_last: bool = True  # NHWC memory format for the convolutions (2-core CPU: 1.6x NCHW's img/s)
    compile: bool = False  # torch.compile the model
    threads: Optional[int] = None  # CPU threads for torch (None: all CPUs, shared by torchrun's local processes)
    fsdp: bool = False  # under torchrun: shard weights, gradients, AdamW states (FSDP2) + activation checkpointing
    sync_bn: bool = True  # under torchrun: BatchNorm statistics over the global batch, not each process's slice
    seed: int = 0  # model init, data order, subsets, augmentation
    deterministic: bool = False  # deterministic kernels: a resumed run then equals an uninterrupted one
    eval_batch_size: int = 500  # images per evaluation forward
    tta_flip: bool = True  # evaluate on each image and its mirror image, averaging the probabilities (only when
    #                        training flips images, hflip > 0: a model that never saw mirrors is not asked to judge them)
    precise_bn: int = 2048  # before each evaluation and checkpoint, re-estimate every BatchNorm's running statistics
    #                         on this many training images (eval transform, train/recalibrate.py), so no checkpoint
    #                         carries statistics that lag its weights (they trail by ~1/momentum steps); 0: off
    # -- run folder --
    out: Optional[str] = None  # run folder (None: nothing written)
    resume: bool = False  # continue from out/checkpoint-last.* (from the start when none exists)
    save_every: int = 0  # also checkpoint every this many optimizer steps (0: at epoch ends only)
    stop_at_step: Optional[int] = None  # stop (after checkpointing) once this many steps are done
    eval_train: bool = False  # also evaluate the (subset of the) training set, eval mode and no augmentation
    skip_nonfinite: bool = False  # skip an optimizer step whose loss is NaN/inf instead of stopping
    progress: bool = True  # tqdm progress bar per epoch (stderr)
    quiet: bool = False  # no per-epoch summary lines
    recipe: Optional[str] = None  # the recipe these settings came from (recorded only)
    log: Optional[str] = None  # experiment tracking into the run folder: "tensorboard", "wandb" or both, comma-separated

    @property
    def eval_flip(self) -> bool:
        """Whether evaluation averages each image with its mirror (tta_flip, when training flips images)."""
        return self.tta_flip and self.augment and self.hflip > 0

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with fields changed (None sets None: clip_grad=None turns clipping off; lists become tuples);
        unknown names raise ValueError."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown training setting(s): {', '.join(unknown)}"
                             f"{did_you_mean(unknown[0], sorted(known)) if len(unknown) == 1 else ''}")
        return dataclasses.replace(self, **{k: (tuple(v) if isinstance(v, list) else v) for k, v in changes.items()})

    def validate(self) -> "TrainConfig":
        self._check_types()

        def positive(name, allow_zero=False):
            v = getattr(self, name)
            if v is not None and (v < 0 or (v == 0 and not allow_zero)):
                raise ValueError(f"{name}={v!r} must be {'non-negative' if allow_zero else 'positive'}")

        for name in ("epochs", "batch_size", "micro_batch_size", "lr", "train_subset", "val_subset", "eval_batch_size",
                     "threads", "stop_at_step"):
            positive(name)
        for name in ("min_lr", "warmup_epochs", "weight_decay", "ema_decay", "mixup", "cutmix", "save_every",
                     "randaugment_n", "randaugment_m", "drop_path", "label_smoothing", "workers", "recalibrate_bn",
                     "precise_bn", "min_epoch_images"):
            positive(name, allow_zero=True)
        if not 0 < self.val_fraction < 1:  # checked before the run folder is written, as every other setting
            raise ValueError(f"val_fraction={self.val_fraction} must be in (0, 1): training needs validation images "
                             f"(a folder with train/ and val/ ignores it)")
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"layer_decay={self.layer_decay} must be in (0, 1]")
        for name in ("freeze_stages", "recalibrate_bn", "precise_bn", "min_epoch_images"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name}={v!r} must be a non-negative integer")
        if self.micro_batch_size and self.micro_batch_size > self.batch_size:
            raise ValueError(f"micro_batch_size={self.micro_batch_size} exceeds batch_size={self.batch_size}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r} must be one of {', '.join(map(repr, SCHEDULES))}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision={self.precision!r} must be 'auto', 'fp32' or 'bf16'")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay={self.ema_decay} must be in [0, 1)")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing={self.label_smoothing} must be in [0, 1)")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"crop_scale={self.crop_scale} must satisfy 0 < low <= high <= 1")
        positive("img_size")  # and a multiple of the model's total stride: engine.check_model, with the registry
        if self.fsdp and self.ema_decay > 0:
            raise ValueError("fsdp does not keep an EMA of sharded weights: drop ema_decay (--ema-decay) or fsdp")
        if self.data != "fashion-mnist" and data_folder_error(self.data) is not None:
            raise data_folder_error(self.data)  # before a run folder is made or a line printed
        if self.resume and not self.out:
            raise ValueError("resume needs the run folder (out)")
        if parse_log(self.log) and not self.out:
            raise ValueError(f"log={self.log!r} writes into the run folder: give one (out)")
        return self

    def _check_types(self) -> None:
        """ValueError naming the first field whose value is not of its declared type (config.json files and
        Python callers can hold anything)."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value, hint = getattr(self, f.name), hints[f.name]
            args = typing.get_args(hint)
            if typing.get_origin(hint) is typing.Union:  # Optional[X]
                if value is None:
                    continue
                hint = next(a for a in args if a is not type(None))
            if not _is_a(value, hint):
                raise ValueError(f"{f.name}={value!r} must be of type {getattr(hint, '__name__', hint)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """The settings of a config.json (a saved None is None: clip_grad None, no clipping); names this version
        does not know are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls().replace(**{k: v for k, v in d.items() if k in known})
