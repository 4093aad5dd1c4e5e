"""Datasets as index-addressed sources of fixed-size image batches.

A source maps a list of sample indices to a batch (images (B, C, S, S) uint8, or float in [0, 1], labels
(B,), indices (B,)), applying the train crop/flip (per-sample parameters from `data.random`) or the eval
resize/center-crop. Fashion-MNIST lives in memory and is transformed batched on the device the batches are
for (`device`: a copy of its uint8 images lives there); image folders are decoded with Pillow in DataLoader
workers that persist from one pass to the next (one loader per source and setting, reused every epoch) and
hand over uint8 batches, page-locked where the device copies asynchronously (CUDA). Everything batch-wide
(RandAugment, normalisation, Mixup) is the caller's, after the copy (coatnet.data.transforms). Unreadable
files are dropped from their batch and reported by path (or raise with `strict`).

An index i >= len(source) addresses sample i % len(source) again, with augmentation parameters of its own
(they are keyed by the index): the training engine repeats a small training set within an epoch that way.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch
from PIL import Image

from ..device_plan import device_plan
from ..preprocess import IMAGENET_MEAN, IMAGENET_STD  # noqa: F401  (re-exported: image folders' normalisation)
from ..preprocess import resize_crop
from ..utils import data_folder_error
from .images import IMAGE_EXTENSIONS, UnreadableImageError, images_under, load_image
from .random import permutation
from .transforms import AugmentConfig, center_crop_box, crop_params, resized_crop

NO_AUGMENT = AugmentConfig(enabled=False)  # what evaluation passes as `aug`: the eval transform
# The eval resize rule of `eval_image`, by the name the preprocessing metadata gives it (docs/interop.md).
EVAL_RULE = "coatnet-centre-box-bilinear"


@dataclass(frozen=True)
class DataSpec:
    """What a model trained on a dataset needs to read new images: saved with every checkpoint."""

    name: str  # "fashion-mnist" or the image folder's path
    classes: tuple[str, ...]  # class names, index = label
    in_chans: int  # 1 (grayscale) or 3 (RGB)
    img_size: int  # square input side, a multiple of the model's total stride
    crop_fraction: float  # eval: centre crop of this fraction of the shorter side, resized to img_size
    mean: tuple[float, ...]  # per-channel normalisation of [0, 1] pixels
    std: tuple[float, ...]
    image_side: Optional[int] = None  # median shorter side of the training images in pixels (None: not known)

    def to_dict(self) -> dict:
        return asdict(self)

    def preprocessing(self, tta_flip: bool = False) -> dict:
        """The exact eval preprocessing, as exported files and Hub folders carry it (docs/interop.md,
        "Preprocessing metadata", states the rule `rule` names); `eval_transform` applies it to a PIL image."""
        return {"rule": EVAL_RULE, "image_mode": "L" if self.in_chans == 1 else "RGB",
                "input_size": [self.in_chans, self.img_size, self.img_size], "crop_fraction": self.crop_fraction,
                "interpolation": "bilinear", "scale": "1/255", "mean": list(self.mean), "std": list(self.std),
                "tta_flip": tta_flip, "class_names": list(self.classes)}

    @classmethod
    def from_dict(cls, d: dict) -> "DataSpec":
        return cls(**{**d, "classes": tuple(d["classes"]), "mean": tuple(d["mean"]), "std": tuple(d["std"])})


@dataclass
class Batch:
    images: torch.Tensor  # (B, C, S, S) uint8, or float32 in [0, 1] (coatnet.data.transforms.to_unit_range)
    labels: torch.Tensor  # (B,) int64
    indices: torch.Tensor  # (B,) int64, positions in the source
    failed: list[str] = field(default_factory=list)  # paths of unreadable files dropped from this batch
    reasons: list[str] = field(default_factory=list)  # why each failed file could not be read (when known)

    @property
    def failures(self) -> dict[str, str]:
        """{path: reason} of the unreadable files dropped from this batch."""
        return dict(zip(self.failed, self.reasons or ["unreadable"] * len(self.failed)))


def pins_memory(device: torch.device | None) -> bool:
    """Whether batches for `device` are handed over page-locked (its copies then run asynchronously)."""
    return device is not None and device_plan(torch.device(device).type).pin_memory


class TensorSource:
    """Images held in memory as a uint8 tensor (N, C, H, W) with labels (N,)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels
        self._on_device: dict[torch.device, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.labels)

    def _images_on(self, device: torch.device | None) -> torch.Tensor:
        """The uint8 images on `device` (copied once: Fashion-MNIST's are 47 MB)."""
        if device is None or torch.device(device) == self.images.device:
            return self.images
        device = torch.device(device)
        if device not in self._on_device:
            self._on_device[device] = self.images.to(device)
        return self._on_device[device]

    def batches(self, index_batches: list[torch.Tensor], spec: DataSpec, *, train: bool = False,
                aug: AugmentConfig = NO_AUGMENT, seed: int = 0, epoch: int = 0, workers: int = 0,
                strict: bool = False, device: torch.device | None = None) -> Iterator[Batch]:
        """Batches of float images in [0, 1], gathered, cropped and flipped on `device` (default: where the
        images are); labels and indices stay on the host."""
        size = (spec.img_size, spec.img_size)
        images = self._images_on(device)
        height, width = images.shape[-2:]
        for idx in index_batches:
            sample = idx % len(self)  # an index past the end is a repeat of this sample (module docstring)
            x = images[sample.to(images.device, non_blocking=True)].to(torch.float32).div_(255)
            if train and aug.enabled:
                boxes, flips = crop_params(seed, epoch, idx.to(images.device, non_blocking=True), height, width, aug,
                                           spec.img_size)
                x = resized_crop(x, boxes, size, flips, outside="zeros" if aug.translate else "border")
            elif (height, width) != size or spec.crop_fraction != 1.0:
                box = torch.tensor(center_crop_box(height, width, spec.crop_fraction, *size)).expand(len(idx), 4)
                x = resized_crop(x, box, size)
            yield Batch(x, self.labels[sample], idx)


class _FolderDataset(torch.utils.data.Dataset):
    """Decodes one file per item in a DataLoader worker. An item's key is (epoch, index): the worker, which
    persists across epochs, learns the epoch from it. Returns (uint8 (C, S, S) or None, label, index, path,
    reason it could not be read or None)."""

    def __init__(self, samples, spec: DataSpec, train: bool, aug: AugmentConfig, seed: int, eval_image=None):
        self.samples, self.spec, self.train, self.aug, self.seed = samples, spec, train, aug, seed
        self.eval_image = eval_image

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]):
        epoch, i = key
        path, label, img, reason = self._load(i)
        if img is None:
            return None, label, i, path, reason
        try:
            if self.eval_image is not None and not self.train:
                x = self.eval_image(img)
            else:
                x = transform_image(img, i, self.spec, self.train, self.aug, self.seed, epoch)
        except Exception as e:  # anything Pillow raised on a hostile file: skipped as an unreadable one
            return None, label, i, path, _failure(e)
        return x, label, i, path, None

    def __getitems__(self, keys: list[tuple[int, int]]) -> list:
        """A batch of items (the DataLoader's fetch when a dataset has this method): as `__getitem__` one by one,
        except that a training batch's crop and flip draws are made in one call (`transform_images`)."""
        epochs = {epoch for epoch, _ in keys}
        if not (self.train and self.aug.enabled) or len(epochs) != 1:
            return [self[key] for key in keys]
        loaded = [(i, *self._load(i)) for _, i in keys]  # (index, path, label, image or None, why not)
        ok = [d for d in loaded if d[3] is not None]
        try:
            crops = iter(transform_images([d[3] for d in ok], [d[0] for d in ok], self.spec, self.train, self.aug,
                                          self.seed, epochs.pop()))
        except Exception:  # a file Pillow decoded but cannot resample: find it one item at a time
            return [self[key] for key in keys]
        return [(None if img is None else next(crops), label, i, path, reason)
                for i, path, label, img, reason in loaded]

    def _load(self, i: int) -> tuple:
        """(path, label, decoded image or None, why it could not be read or None) of sample i."""
        path, label = self.samples[i % len(self.samples)]  # past the end: a repeat (module docstring)
        try:
            return path, label, load_image(path, self.spec.in_chans), None
        except UnreadableImageError as e:  # not an image, empty, truncated, a decompression bomb: reported
            return path, label, None, e.reason
        except Exception as e:  # anything else Pillow raised on a hostile file: skipped the same way
            return path, label, None, _failure(e)


def _failure(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e)[:160]}"


def transform_image(img: Image.Image, index: int, spec: DataSpec, train: bool, aug: AugmentConfig, seed: int,
                    epoch: int) -> torch.Tensor:
    """A decoded image -> uint8 (C, S, S): the train crop and flip of sample `index` (a function of seed,
    epoch and index) or the eval transform (`eval_image`), resized to S = spec.img_size."""
    return transform_images([img], [index], spec, train, aug, seed, epoch)[0]


def transform_images(images: list[Image.Image], indices: list[int], spec: DataSpec, train: bool, aug: AugmentConfig,
                     seed: int, epoch: int) -> list[torch.Tensor]:
    """`transform_image` of each image (sample indices[k]), with a training batch's crop and flip draws made in
    one call: one call per image cost about 0.4 ms of torch overhead, a sixth of a worker's time per 224 px
    image."""
    if not (train and aug.enabled):
        return [eval_image(img, spec) for img in images]
    if not images:
        return []
    boxes, flips = crop_params(seed, epoch, torch.tensor(indices), torch.tensor([img.height for img in images]),
                               torch.tensor([img.width for img in images]), aug, spec.img_size)
    return [resize_crop(img, box.tolist(), spec.img_size, flip=bool(flip))
            for img, box, flip in zip(images, boxes, flips)]


def eval_image(img: Image.Image, spec: DataSpec) -> torch.Tensor:
    """The eval transform of a decoded image -> uint8 (C, S, S): the centred crop keeping spec.crop_fraction
    of the shorter side, resized to S = spec.img_size (see coatnet/preprocess.py)."""
    s = spec.img_size
    width, height = img.size
    return resize_crop(img, center_crop_box(height, width, spec.crop_fraction, s, s), s)


def eval_transform(preprocessing: dict):
    """PIL image -> normalised float (C, S, S): the eval transform that `preprocessing` (DataSpec.preprocessing,
    the "preprocessing" of a Hub folder's config.json or of an exported file's metadata) describes."""
    if preprocessing.get("rule") != EVAL_RULE:
        raise ValueError(f"preprocessing rule {preprocessing.get('rule')!r} is not {EVAL_RULE!r}")
    channels, size, _ = preprocessing["input_size"]
    spec = DataSpec("", tuple(preprocessing["class_names"]), channels, size, preprocessing["crop_fraction"],
                    tuple(preprocessing["mean"]), tuple(preprocessing["std"]))
    mean, std = torch.tensor(spec.mean)[:, None, None], torch.tensor(spec.std)[:, None, None]

    def transform(image: Image.Image) -> torch.Tensor:
        x = eval_image(image.convert(preprocessing["image_mode"]), spec).to(torch.float32) / 255
        return (x - mean) / std

    return transform


def _collate(items) -> tuple:
    ok = [it for it in items if it[0] is not None]
    failed = [it[3] for it in items if it[0] is None]
    reasons = [it[4] for it in items if it[0] is None]
    if ok:
        images = torch.stack([it[0] for it in ok])
    else:
        images = torch.zeros(0, 1, 1, 1, dtype=torch.uint8)
    labels = torch.tensor([it[1] for it in ok], dtype=torch.int64)
    indices = torch.tensor([it[2] for it in ok], dtype=torch.int64)
    return images, labels, indices, failed, reasons


class _Plan:
    """The batch sampler of a persistent loader: the batches of the pass about to start, set before each."""

    def __init__(self):
        self.batches: list[list[tuple[int, int]]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


@dataclass
class _Loader:
    loader: torch.utils.data.DataLoader
    plan: _Plan
    busy: bool = False  # a pass is being read (a second reader at the same time gets a loader of its own)


class FolderSource:
    """Image files with labels: a list of (path, label). `eval_image`, optional: PIL image -> uint8 (C, S, S)
    used instead of the eval centre crop (e.g. the resize and crop that published weights were evaluated with).

    Keeps one DataLoader per setting (train or eval, augmentation, seed, workers, pinning), whose workers
    persist from one pass to the next: their start (a fork and the sample list sent to each) is paid once per
    run, not once per epoch. `close()` ends them; so does dropping the source."""

    def __init__(self, samples: list[tuple[str, int]], eval_image=None):
        self.samples, self.eval_image = samples, eval_image
        self.labels = torch.tensor([s[1] for s in samples], dtype=torch.int64)
        self._loaders: dict[tuple, _Loader] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def _new_loader(self, spec: DataSpec, train: bool, aug: AugmentConfig, seed: int, workers: int, pin: bool,
                    persistent: bool) -> _Loader:
        plan = _Plan()
        dataset = _FolderDataset(self.samples, spec, train, aug, seed, self.eval_image)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=plan, num_workers=workers, collate_fn=_collate,
                                             pin_memory=pin, persistent_workers=persistent and workers > 0,
                                             prefetch_factor=4 if workers else None)
        return _Loader(loader, plan)

    def batches(self, index_batches: list[torch.Tensor], spec: DataSpec, *, train: bool = False,
                aug: AugmentConfig = NO_AUGMENT, seed: int = 0, epoch: int = 0, workers: int = 0,
                strict: bool = False, device: torch.device | None = None) -> Iterator[Batch]:
        """Batches of uint8 images, page-locked when `device`'s copies are asynchronous (CUDA)."""
        pin = pins_memory(device)
        key = (spec, train, aug, seed, workers, pin)
        entry = self._loaders.get(key)
        if entry is None:
            entry = self._loaders[key] = self._new_loader(spec, train, aug, seed, workers, pin, persistent=True)
        elif entry.busy:  # read while another pass of the same setting is open: a loader for this pass alone
            entry = self._new_loader(spec, train, aug, seed, workers, pin, persistent=False)
        entry.plan.batches = [[(epoch, i) for i in b.tolist()] for b in index_batches]
        entry.busy = True
        try:
            for images, labels, indices, failed, reasons in entry.loader:
                if failed and strict:
                    raise ValueError(f"cannot read image {failed[0]}: {reasons[0]} (run without --strict to skip "
                                     f"unreadable files)")
                if images.shape[0] == 0:
                    images = torch.zeros(0, spec.in_chans, spec.img_size, spec.img_size, dtype=torch.uint8)
                yield Batch(images, labels, indices, failed, reasons)
        finally:
            entry.busy = False

    def close(self) -> None:
        """End the persistent workers (a later pass starts new ones)."""
        for entry in self._loaders.values():
            iterator = getattr(entry.loader, "_iterator", None)
            if iterator is not None and hasattr(iterator, "_shutdown_workers"):
                iterator._shutdown_workers()
        self._loaders.clear()


# -- building ------------------------------------------------------------------------------------------
def _list_images(folder: Path) -> list[str]:
    return images_under(folder)


def _class_dirs(root: Path) -> list[str]:
    return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def scan_image_folder(root: str | os.PathLike, val_fraction: float, seed: int
                      ) -> tuple[list[tuple[str, int]], list[tuple[str, int]], list[str]]:
    """(train samples, val samples, class names) of an ImageFolder root: root/train/<class>/* and
    root/val/<class>/*, or root/<class>/* split per class by a seeded `val_fraction`."""
    root = Path(root)
    error = data_folder_error(root)  # missing, or a file (an image of the folder rather than the folder)
    if error is not None:
        raise error
    if (root / "train").is_dir():
        classes = _class_dirs(root / "train")
        if not classes:
            raise ValueError(f"{root / 'train'} has no class subfolders")
        val_dir = root / "val" if (root / "val").is_dir() else root / "validation"
        if not val_dir.is_dir():
            raise FileNotFoundError(f"{root} has train/ but no val/ folder")
        extra = sorted(set(_class_dirs(val_dir)) - set(classes))
        if extra:
            raise ValueError(f"{val_dir} has classes not in train/: {', '.join(extra[:5])}")
        train = [(p, k) for k, c in enumerate(classes) for p in _list_images(root / "train" / c)]
        val = [(p, k) for k, c in enumerate(classes) if (val_dir / c).is_dir() for p in _list_images(val_dir / c)]
    else:
        classes = _class_dirs(root)
        if not classes:
            raise ValueError(f"{root} has no class subfolders (expected {root}/<class>/<image> "
                             f"or train/ and val/ folders)")
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction={val_fraction} must be in (0, 1) to split {root}")
        train, val = [], []
        for k, c in enumerate(classes):
            files = _list_images(root / c)
            order = permutation(seed, k, len(files)).tolist()
            n_val = int(round(len(files) * val_fraction)) if len(files) > 1 else 0
            val += [(files[i], k) for i in sorted(order[:n_val])]
            train += [(files[i], k) for i in sorted(order[n_val:])]
    if not train:
        raise ValueError(f"no images found under {root} (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    seen = {k for _, k in train}
    empty = [c for k, c in enumerate(classes) if k not in seen]
    if empty:  # a head with an output that no image ever trains
        where = root / "train" if (root / "train").is_dir() else root
        raise ValueError(f"{where}: class folder{'s' if len(empty) > 1 else ''} {', '.join(empty[:5])} "
                         f"{'hold' if len(empty) > 1 else 'holds'} no training images (extensions: "
                         f"{', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder")
    return train, val, classes
