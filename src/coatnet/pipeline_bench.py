"""`coatnet bench --input-pipeline`: images/s of the training input pipeline alone (no model), per DataLoader
worker process, with a recipe's augmentation (issue 23 item 2), on a folder of JPEGs and on tar shards written
from it, beside timm's loader with the same augmentation in the same run when timm is importable.

Ours, as `coatnet train` runs it: workers decode and crop/flip (uint8), the batch crosses to the device,
RandAugment, normalisation and Mixup/CutMix run there (train.run_data.train_inputs). timm's, as its train.py
runs it: `create_loader` with RandAugment in the workers (PIL), its prefetcher normalising on the device, and
`timm.data.Mixup` on the batch. RandAugment's magnitude is ours / 3 for timm (ours: 0..30, timm's: 0..10, the
same angles and shifts); timm's op list differs slightly (it adds Invert and SolarizeAdd).

Each pipeline passes twice over the images; the second pass is timed from its first batch on (the first pays
for starting workers and filling the page cache): images after the first batch / seconds.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .bench import synchronize
from .data.datasets import DataSpec, FolderSource, scan_image_folder
from .data.shards import ShardSource, write_shards
from .preprocess import IMAGENET_MEAN, IMAGENET_STD
from .train.config import TrainConfig
from .train.run_data import augment_config, train_inputs
from .train.recipes import get_recipe
from .train.runtime import Runtime, plan_for, resolve_device
from .utils import reuse_freed_memory


def write_jpeg_folder(root: str | Path, images: int, classes: int = 4, seed: int = 0,
                      size: tuple[int, int] = (500, 375)) -> Path:
    """`images` JPEGs of about `size` (ImageNet's typical 500x375, sides varied by up to 20%) in `classes` class
    folders under root: smooth random colour fields with noise, which compress like photographs (~50-100 kB)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for i in range(images):
        w, h = (int(s * rng.uniform(0.8, 1.2)) for s in size)
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR), dtype=np.int16)
        pixels = np.clip(field + rng.normal(0, 12, field.shape), 0, 255).astype(np.uint8)
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{i:06d}.jpg", quality=90)
    return root


def _timed_passes(batches_of_pass, run_batch, device: torch.device) -> dict:
    """Two passes; the second timed from its first batch: {"images_per_s", "images", "seconds"}."""
    for p in range(2):
        t0, images = None, 0
        for batch in batches_of_pass(p):
            n = run_batch(batch)
            synchronize(device)
            if t0 is None:
                t0 = time.perf_counter()
            else:
                images += n
        seconds = time.perf_counter() - t0 if t0 is not None else 0.0
    return {"images_per_s": images / max(seconds, 1e-9), "images": images, "seconds": seconds}


def _ours(source, spec: DataSpec, cfg: TrainConfig, workers: int, batch: int, runtime: Runtime) -> dict:
    aug = augment_config(cfg)
    order = torch.arange(len(source))
    index_batches = list(order.split(batch))

    def batches_of_pass(p):
        return source.batches(index_batches, spec, train=True, aug=aug, seed=cfg.seed, epoch=p, workers=workers,
                              device=runtime.device)

    def run_batch(b):
        train_inputs(b, aug, spec, len(spec.classes), cfg.seed, 0, runtime)
        return len(b.labels)

    return _timed_passes(batches_of_pass, run_batch, runtime.device)


def _timm(folder: Path, spec: DataSpec, cfg: TrainConfig, workers: int, batch: int, device: torch.device) -> dict:
    """timm's loader on `folder` with cfg's augmentation. Raises ImportError without timm."""
    import timm.data  # noqa: PLC0415  (optional: the comparison only)

    aug = augment_config(cfg)
    dataset = timm.data.ImageDataset(str(folder))
    auto = f"rand-m{aug.randaugment_m / 3:g}-n{aug.randaugment_n}" if aug.randaugment_n else None
    loader = timm.data.create_loader(
        dataset, input_size=(3, spec.img_size, spec.img_size), batch_size=batch, is_training=True,
        scale=aug.crop_scale, ratio=aug.crop_ratio, hflip=aug.hflip, color_jitter=0.0, auto_augment=auto,
        interpolation="bilinear", mean=spec.mean, std=spec.std, num_workers=workers, device=device,
        use_prefetcher=True, pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    mixup = (timm.data.Mixup(mixup_alpha=aug.mixup_alpha, cutmix_alpha=aug.cutmix_alpha,
                             label_smoothing=aug.label_smoothing, num_classes=len(spec.classes))
             if aug.mixup_alpha > 0 or aug.cutmix_alpha > 0 else None)

    def run_batch(b):
        x, y = b
        if mixup is not None and len(x) % 2 == 0:
            mixup(x, y)
        return len(x)

    return _timed_passes(lambda p: loader, run_batch, device)


def input_pipeline_bench(data: str | None = None, shards: str | None = None, images: int = 256,
                         img_size: int = 224, batch: int = 64, workers: int = 1, recipe: str = "paper",
                         device: str = "cpu", compare_timm: bool = True, seed: int = 0,
                         threads: int | None = None) -> dict:
    """Images/s of the input pipeline (see the module docstring) on `data` (an image folder; default: `images`
    generated JPEGs in a temporary folder) and on `shards` (a `coatnet shards` folder; default: written from
    the image folder when webdataset is importable), with `workers` DataLoader workers, `recipe`'s augmentation
    at `img_size`, batches of `batch` on `device`; the training process's batch augmentation (on a CPU device)
    with `threads` torch threads, by default the cores the workers leave (at least 1): on 2 cores with one worker,
    two threads in the training process and the worker contend for the cores (measured: ours 0.84x timm's with
    2 threads, 1.16-1.30x with 1; timm's training process does only Mixup). Returns {"settings",
    "pipelines": {name: {"images_per_s", "per_worker", ...}}, "ratios" (ours / timm per worker),
    "skipped": {name: why}}."""
    if batch < 1 or workers < 0 or images < 2:
        raise ValueError(f"batch {batch}, workers {workers}, images {images}: need batch >= 1, workers >= 0, "
                         f"images >= 2")
    dev = resolve_device(device)
    cfg = TrainConfig(**{**get_recipe(recipe), "img_size": img_size, "seed": seed})
    runtime = Runtime(dev, "fp32", channels_last=False, compile=False)
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) - workers) if dev.type == "cpu" else torch.get_num_threads()
    if threads < 1:
        raise ValueError(f"threads {threads} must be at least 1")
    threads_before = torch.get_num_threads()
    if plan_for(dev).reuse_freed_memory:  # as setup_runtime does for training (process-wide: timm's Mixup too)
        reuse_freed_memory()
    result: dict = {"settings": {"recipe": recipe, "img_size": img_size, "batch": batch, "workers": workers,
                                 "device": str(dev), "threads": threads, "augment": augment_config(cfg).__dict__},
                    "pipelines": {}, "skipped": {}}
    per_worker = max(workers, 1)  # with 0 workers the main process decodes
    with contextlib.ExitStack() as stack:
        torch.set_num_threads(threads)
        stack.callback(torch.set_num_threads, threads_before)
        if data is None:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="coatnet_pipeline_")))
            data = str(write_jpeg_folder(tmp / "jpegs", images, seed=seed))
            result["settings"]["generated_images"] = images
        result["settings"]["data"] = data
        train, val, classes = scan_image_folder(data, 0.5, seed)
        samples = sorted(train + val)  # every image of the folder
        spec = DataSpec(data, tuple(classes), 3, img_size, 0.875, IMAGENET_MEAN, IMAGENET_STD)
        sources = {"ours:folder": FolderSource(samples)}
        if shards is None:
            try:
                shards = str(Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="coatnet_shards_"))) / "s")
                write_shards(data, shards, shard_size=max(len(samples) // 4, 1), val_fraction=0.01, seed=seed)
            except (ImportError, ValueError) as e:
                shards = None
                result["skipped"]["ours:shards"] = f"{type(e).__name__}: {e}"
        if shards is not None:
            sources["ours:shards"] = ShardSource(shards, "train")
            result["settings"]["shards"] = shards
        for name, source in sources.items():
            numbers = _ours(source, spec, cfg, workers, batch, runtime)
            result["pipelines"][name] = {**numbers, "per_worker": numbers["images_per_s"] / per_worker}
            if hasattr(source, "close"):
                source.close()
        if compare_timm:
            try:
                numbers = _timm(Path(data), spec, cfg, workers, batch, dev)
                result["pipelines"]["timm:folder"] = {**numbers, "per_worker": numbers["images_per_s"] / per_worker}
            except ImportError as e:
                result["skipped"]["timm:folder"] = (f"timm is not importable here ({e}); run with the python of the "
                                                    f"environment ../shared/tools/timm-env.sh builds")
    timm_rate = result["pipelines"].get("timm:folder", {}).get("per_worker")
    result["ratios"] = ({name: p["per_worker"] / timm_rate for name, p in result["pipelines"].items()
                         if name.startswith("ours:")} if timm_rate else {})
    return result
