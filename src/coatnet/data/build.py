"""`build_data`: what `--data` names -> (train source, val source, DataSpec). Fashion-MNIST's IDX files
(in memory), a folder of tar shards written by `coatnet shards`, or an image folder."""
from __future__ import annotations

from pathlib import Path

import torch

from ..preprocess import IMAGENET_MEAN, IMAGENET_STD
from ..utils import data_folder_error
from .datasets import DataSpec, FolderSource, TensorSource, scan_image_folder
from .idx import DEFAULT_FASHION_MNIST_DIR, FASHION_MNIST_CLASSES, load_fashion_mnist
from .images import fit_side, median_side
from .shards import build_shard_data, is_shard_folder

FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)


def build_data(data: str, data_dir: str | None = None, val_fraction: float = 0.1, img_size: int | None = None,
               crop_fraction: float | None = None, seed: int = 0, size_multiple: int = 32):
    """(train source, val source, DataSpec) for `data`: "fashion-mnist" (val = the 10,000 test images),
    an image folder path, or a folder of tar shards written by `coatnet shards`. Without `img_size`: 32 for
    Fashion-MNIST, 224 for shards, and for an image folder the training images' median shorter side rounded to
    a multiple of `size_multiple` (the model's total stride: the sides it takes)."""
    if data == "fashion-mnist":
        root = data_dir or DEFAULT_FASHION_MNIST_DIR
        sources = []
        for split in ("train", "test"):
            images, labels = load_fashion_mnist(root, split)
            sources.append(TensorSource(torch.from_numpy(images.copy()).unsqueeze(1),
                                        torch.from_numpy(labels)))
        spec = DataSpec("fashion-mnist", tuple(FASHION_MNIST_CLASSES), 1, img_size or 32,
                        1.0 if crop_fraction is None else crop_fraction, FASHION_MNIST_MEAN, FASHION_MNIST_STD,
                        image_side=28)
        return sources[0], sources[1], spec
    path = Path(data)
    error = data_folder_error(path)
    if error is not None:
        raise error
    if is_shard_folder(path):  # written by `coatnet shards`
        return build_shard_data(path, img_size, crop_fraction)
    train, val, classes = scan_image_folder(path, val_fraction, seed)
    side = median_side([p for p, _ in train])
    if img_size is None:  # 224 upsampled 28 px images 8x: 819M multiply-adds per image for coatnet_micro
        img_size = fit_side(side, size_multiple) if side else 224
    spec = DataSpec(str(path), tuple(classes), 3, img_size, 0.875 if crop_fraction is None else crop_fraction,
                    IMAGENET_MEAN, IMAGENET_STD, image_side=side)
    return FolderSource(train), FolderSource(val), spec
