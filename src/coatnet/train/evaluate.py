"""Evaluation: loss, top-1 and top-5 of a model on a source (eval transform, no augmentation)."""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..data import build_data
from ..data.datasets import DataSpec, FolderSource, _class_dirs, _list_images
from ..data.random import permutation
from ..data.transforms import normalize
from ..models import create_model
from ..models.pretrained import HALF, default_tag, get_weights, weights_of
from ..preprocess import EvalTransform
from .checkpoint import load_model
from .distributed import all_reduce_sums, is_sharded, rank_and_world, shard
from .recalibrate import recalibrate_batchnorm
from .runtime import Runtime, setup_runtime

log = logging.getLogger(__name__)


def skipped_summary(skipped: dict[str, str], limit: int = 10) -> str:
    """ "skipped 3 unreadable files: a.jpg (empty file), ..." on one line, the first `limit` named."""
    items = [f"{p} ({r})" if r else p for p, r in sorted(skipped.items())]
    more = f", and {len(items) - limit} more" if len(items) > limit else ""
    noun = "file" if len(items) == 1 else "files"
    return f"skipped {len(items)} unreadable {noun}: {', '.join(items[:limit])}{more}"


def _at_least_one(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise ValueError(f"{name}={value} must be at least 1")


def subset_indices(n: int, k: int | None, seed: int, stream: int) -> torch.Tensor:
    """Sorted positions of a seeded subset of k of n items (all n when k is None or >= n)."""
    if k is None or k >= n:
        return torch.arange(n)
    return permutation(seed, -1 - stream, n)[:k].sort().values


def _scores(logits: torch.Tensor, y: torch.Tensor, k: int) -> tuple[float, int, int]:
    """(summed cross-entropy, top-1 hits, top-k hits) of one batch."""
    logits = logits.float()
    top = logits.topk(k, dim=-1).indices
    return (F.cross_entropy(logits, y, reduction="sum").item(), (top[:, 0] == y).sum().item(),
            (top == y[:, None]).any(-1).sum().item())


@torch.no_grad()
def evaluate(model: nn.Module, source, indices: torch.Tensor, spec: DataSpec, runtime: Runtime,
             batch_size: int = 500, workers: int = 0, strict: bool = False, tta_flip: bool = False) -> dict:
    """{"loss": mean cross-entropy, "top1": %, "top5": % (top-k with k = min(5, classes)), "n": images,
    "skipped": {path: reason} of unreadable files left out (this process's)} over source[indices] (sharded
    over processes, summed back). `tta_flip`: score each image by its class probabilities averaged with those
    of its mirror image (test-time augmentation)."""
    was_training = model.training
    model.eval()
    rank, world = rank_and_world()
    batches = [shard(b, rank, world) for b in indices.split(batch_size)]
    k = min(5, len(spec.classes))
    loss_sum = correct1 = correct5 = n = 0.0
    skipped: dict[str, str] = {}
    for batch in source.batches(batches, spec, workers=workers, strict=strict, device=runtime.device):
        skipped.update(batch.failures)
        if len(batch.labels) == 0 and not is_sharded(model):  # a sharded forward is collective
            continue
        x = normalize(runtime.inputs(batch.images), spec.mean, spec.std)  # uint8 crosses to the device
        y = batch.labels.to(runtime.device)
        with runtime.autocast():
            logits = model(x)
            if tta_flip:  # log of the mean probability: cross-entropy and ranking of the averaged prediction
                logits = torch.logaddexp(logits.float().log_softmax(-1), model(x.flip(-1)).float().log_softmax(-1))
        loss, c1, c5 = _scores(logits, y, k)
        loss_sum, correct1, correct5, n = loss_sum + loss, correct1 + c1, correct5 + c5, n + len(y)
    model.train(was_training)
    loss_sum, correct1, correct5, n = all_reduce_sums([loss_sum, correct1, correct5, n])
    n = int(n)
    if n == 0:
        return {"loss": float("nan"), "top1": float("nan"), "top5": float("nan"), "n": 0, "skipped": skipped}
    return {"loss": loss_sum / n, "top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "n": n,
            "skipped": skipped}


def evaluate_checkpoint(checkpoint: str, data: str | None = None, data_dir: str | None = None,
                        split: str = "val", val_fraction: float | None = None, subset: int | None = None,
                        batch_size: int = 500, device: str = "auto", precision: str = "fp32",
                        workers: int | None = None, strict: bool = False, img_size: int | None = None,
                        recalibrate_bn: int = 0, threads: int | None = None, tta_flip: bool | None = None) -> dict:
    """Evaluate a checkpoint on `split` ("val", "train" or "both") of `data` (default: the data it was trained
    on, as recorded in it). "both" adds train_/val_ prefixed keys and gap_top1 = train top-1 - val top-1.
    `img_size`: evaluate at another input side (relative-position tables resized, no training), e.g. a
    model trained at 32 px at 64 px. `recalibrate_bn` N > 0: first re-estimate the BatchNorm statistics on
    a seeded subset of N training images (eval transform, no labels; train.recalibrate). `tta_flip`:
    average each image's prediction with its mirror's (None: as the run that made the checkpoint did)."""
    if split not in ("val", "train", "both"):
        raise ValueError(f"split={split!r} must be 'val', 'train' or 'both'")
    _at_least_one(batch_size=batch_size, subset=subset)
    if workers is not None and workers < 0:
        raise ValueError(f"workers={workers} must be non-negative")
    if isinstance(recalibrate_bn, bool) or not isinstance(recalibrate_bn, int) or recalibrate_bn < 0:
        raise ValueError(f"recalibrate_bn={recalibrate_bn!r} must be a non-negative integer")
    runtime = setup_runtime(device, precision, threads=threads)
    model, spec, info = load_model(checkpoint, runtime.device)
    runtime.prepare(model)
    if img_size is not None and img_size != spec.img_size:
        model.set_input_size(img_size)  # raises ValueError unless a multiple of the model's reduction
        spec = dataclasses.replace(spec, img_size=img_size)
    run = info.get("run", {})
    data = data or run.get("data") or spec.name
    train_src, val_src, data_spec = build_data(
        data, data_dir or run.get("data_dir"), run.get("val_fraction", 0.1) if val_fraction is None else val_fraction,
        spec.img_size, spec.crop_fraction, run.get("seed", 0))
    if data_spec.in_chans != spec.in_chans:
        raise ValueError(f"{data} has {data_spec.in_chans}-channel images; the checkpoint expects {spec.in_chans}")
    if list(data_spec.classes) != list(spec.classes):
        raise ValueError(f"{data}'s classes ({len(data_spec.classes)}) differ from the checkpoint's "
                         f"({len(spec.classes)}): {', '.join(data_spec.classes[:5])} ...")
    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    if recalibrate_bn:
        calib_idx = subset_indices(len(train_src), recalibrate_bn, run.get("seed", 0), stream=3)
        recalibrate_batchnorm(model, train_src, calib_idx, spec, runtime, batch_size, workers, strict)
    out = {}
    for name, src in (("train", train_src), ("val", val_src)):
        if split in (name, "both"):
            idx = subset_indices(len(src), subset, run.get("seed", 0), stream=7)
            flip = run.get("tta_flip", False) if tta_flip is None else tta_flip
            out[name] = evaluate(model, src, idx, spec, runtime, batch_size, workers, strict, tta_flip=flip)
            skipped = out[name].pop("skipped")
            if skipped:
                log.warning(f"warning: {name}: {skipped_summary(skipped)}")
    if split != "both":
        return out[split]
    result = {f"{s}_{k}": v for s in ("train", "val") for k, v in out[s].items()}
    result["gap_top1"] = result["train_top1"] - result["val_top1"]
    return result


def evaluate_published(checkpoint: str, data: str, model: str | None = None, img_size: int | None = None,
                       subset: int | None = None, batch_size: int = 100, device: str = "auto",
                       precision: str = "fp32", workers: int | None = None, strict: bool = False,
                       threads: int | None = None, seed: int = 0) -> dict:
    """Published weights (a tag from `coatnet weights`, or timm's file) on a folder of their label set,
    with their own eval transform (the weights' metadata: resize, centre crop, interpolation, mean/std):
    {"top1", "top5", "loss", "n", "model", "weights", "published_top1"}. `data`: <class>/<image> folders,
    or a root with val/ (used whole); sorted class folders must be the weights' classes in order (ImageNet's
    wnid folders n01440764 ... are). `model` is needed for a file not named after a tag; `img_size` builds
    the model at another size (tables resized) and evaluates at that size."""
    _at_least_one(batch_size=batch_size, subset=subset)
    published = weights_of(checkpoint)
    name = model or (published.model if published else None)
    if name is None:
        raise ValueError(f"{checkpoint}: not one of our checkpoints nor named after a published tag; "
                         f"name its model (--model NAME)")
    root = Path(data)
    root = root / "val" if (root / "val").is_dir() else root
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {data}")
    classes = _class_dirs(root)
    samples = [(p, k) for k, c in enumerate(classes) for p in _list_images(root / c)]
    if not samples:
        raise ValueError(f"no images under {root}/<class>/ to evaluate on")
    runtime = setup_runtime(device, precision, threads=threads)
    net = runtime.prepare(create_model(name, pretrained=checkpoint, img_size=img_size)).eval()
    if len(classes) != net.num_classes:
        raise ValueError(f"{data} has {len(classes)} class folders; the weights classify {net.num_classes} classes")
    recipe = published or (get_weights(default_tag(name)) if default_tag(name) else None)
    transform = (recipe.eval_transform() if recipe else  # timm's default for its CoAtNets
                 EvalTransform(net.config.image_size[0], 0.95, "center", "bicubic", HALF, HALF))
    if img_size is not None:
        transform = EvalTransform(img_size, transform.crop_pct, transform.crop_mode, transform.interpolation,
                                  transform.mean, transform.std)
    spec = DataSpec(str(root), tuple(classes), 3, transform.size, transform.crop_pct, transform.mean, transform.std)
    source = FolderSource(samples, eval_image=transform.resize_crop)  # the weights' resize and crop
    idx = subset_indices(len(samples), subset, seed, stream=7)
    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    result = evaluate(net, source, idx, spec, runtime, batch_size, workers, strict)
    skipped = result.pop("skipped")
    if skipped:
        log.warning(f"warning: {skipped_summary(skipped)}")
    if result["n"] == 0:
        raise ValueError(f"none of the {len(idx)} images under {root} could be read")
    return {**result, "model": name, "weights": published.tag if published else str(checkpoint),
            "published_top1": published.top1 if published and img_size in (None, published.input_size) else None}
