"""Reading IDX files (the MNIST family's format), and Fashion-MNIST as uint8 arrays."""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
# IDX type codes -> numpy dtypes (big-endian on disk).
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (optionally gzipped) as a numpy array of its declared shape and type."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_DTYPES[data[2]])
    offset = 4 + 4 * ndim
    count = int(np.prod(shape)) if shape else 0
    if len(data) - offset != count * dtype.itemsize:
        raise ValueError(f"{path}: {len(data) - offset} bytes of data for shape {shape} of {dtype}")
    return np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape).astype(dtype.newbyteorder("="))


def _find(root: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    return None


def load_fashion_mnist(root: str | os.PathLike | None = None, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST `split` ("train": 60,000 images, "test": 10,000) as (images (N, 28, 28) uint8,
    labels (N,) int64). Raises FileNotFoundError with install instructions when the files are missing."""
    if split not in _FILES:
        raise ValueError(f"split={split!r} must be 'train' or 'test'")
    root = Path(root or DEFAULT_FASHION_MNIST_DIR)
    paths = [_find(root, stem) for stem in _FILES[split]]
    if any(p is None for p in paths):
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {root} (expected {_FILES[split][0]}.gz); install it with "
            f"`apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or point --data-dir at the IDX files")
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(f"{root}: images {images.shape} and labels {labels.shape} do not match")
    return images, labels.astype(np.int64)
