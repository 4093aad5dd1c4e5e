"""Evaluation: loss, top-1 and top-5 of a model on a source (eval transform, no augmentation)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data.datasets import DataSpec
from ..data.random import permutation
from ..data.transforms import AugmentConfig, normalize
from .distributed import all_reduce_sums, is_sharded, rank_and_world, shard
from .runtime import Runtime, setup_runtime

NO_AUGMENT = AugmentConfig(enabled=False)  # the eval transform


def skipped_summary(skipped: dict[str, str], limit: int = 10) -> str:
    """ "skipped 3 unreadable files: a.jpg (empty file), ..." on one line, the first `limit` named."""
    items = [f"{p} ({r})" if r else p for p, r in sorted(skipped.items())]
    more = f", and {len(items) - limit} more" if len(items) > limit else ""
    noun = "file" if len(items) == 1 else "files"
    return f"skipped {len(items)} unreadable {noun}: {', '.join(items[:limit])}{more}"


def subset_indices(n: int, k: int | None, seed: int, stream: int) -> torch.Tensor:
    """Sorted positions of a seeded subset of k of n items (all n when k is None or >= n)."""
    if k is None or k >= n:
        return torch.arange(n)
    return permutation(seed, -1 - stream, n)[:k].sort().values


@torch.no_grad()
def evaluate(model: nn.Module, source, indices: torch.Tensor, spec: DataSpec, runtime: Runtime,
             batch_size: int = 500, workers: int = 0, strict: bool = False) -> dict:
    """{"loss": mean cross-entropy, "top1": %, "top5": % (top-k with k = min(5, classes)), "n": images,
    "skipped": {path: reason} of unreadable files left out (this process's)} over source[indices] (sharded
    over processes, summed back)."""
    was_training = model.training
    model.eval()
    rank, world = rank_and_world()
    batches = [shard(b, rank, world) for b in indices.split(batch_size)]
    k = min(5, len(spec.classes))
    loss_sum = correct1 = correct5 = n = 0.0
    skipped: dict[str, str] = {}
    for batch in source.batches(batches, spec, False, NO_AUGMENT, 0, 0, workers, strict):
        skipped.update(batch.failures)
        if len(batch.labels) == 0 and not is_sharded(model):  # a sharded forward is collective
            continue
        x = runtime.inputs(normalize(batch.images, spec.mean, spec.std))
        y = batch.labels.to(runtime.device)
        with runtime.autocast():
            logits = model(x)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        top = logits.topk(k, dim=-1).indices
        correct1 += (top[:, 0] == y).sum().item()
        correct5 += (top == y[:, None]).any(-1).sum().item()
        n += len(y)
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
                        recalibrate_bn: int = 0, threads: int | None = None) -> dict:
    """Evaluate a checkpoint on `split` ("val", "train" or "both") of `data` (default: the data it was trained
    on, as recorded in it). "both" adds train_/val_ prefixed keys and gap_top1 = train top-1 - val top-1.
    `img_size`: evaluate at another input side (relative-position tables resized, no training), e.g. a
    model trained at 32 px at 64 px. `recalibrate_bn` N > 0: first re-estimate the BatchNorm statistics on
    a seeded subset of N training images (eval transform, no labels; train.recalibrate)."""
    import dataclasses
    import os
    import sys

    from ..data import build_data
    from .checkpoint import load_model
    from .recalibrate import recalibrate_batchnorm

    if split not in ("val", "train", "both"):
        raise ValueError(f"split={split!r} must be 'val', 'train' or 'both'")
    for name, value in (("batch_size", batch_size), ("subset", subset)):
        if value is not None and value < 1:
            raise ValueError(f"{name}={value} must be at least 1")
    if workers is not None and workers < 0:
        raise ValueError(f"workers={workers} must be non-negative")
    if isinstance(recalibrate_bn, bool) or not isinstance(recalibrate_bn, int) or recalibrate_bn < 0:
        raise ValueError(f"recalibrate_bn={recalibrate_bn!r} must be a non-negative integer")
    runtime = setup_runtime(device, precision, threads=threads)
    model, spec, info = load_model(checkpoint, runtime.device)
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
            out[name] = evaluate(model.to(runtime.device), src, idx, spec, runtime, batch_size, workers, strict)
            skipped = out[name].pop("skipped")
            if skipped:
                print(f"warning: {name}: {skipped_summary(skipped)}", file=sys.stderr, flush=True)
    if split != "both":
        return out[split]
    result = {f"{s}_{k}": v for s in ("train", "val") for k, v in out[s].items()}
    result["gap_top1"] = result["train_top1"] - result["val_top1"]
    return result
