"""Data: Fashion-MNIST IDX files, image folders, Pillow decoding and batched tensor augmentation."""
from .build import build_data
from .datasets import DataSpec, FolderSource, TensorSource, eval_transform
from .idx import FASHION_MNIST_CLASSES, load_fashion_mnist, read_idx
from .images import load_image

__all__ = ["DataSpec", "FolderSource", "TensorSource", "build_data", "eval_transform", "FASHION_MNIST_CLASSES",
           "load_fashion_mnist", "read_idx", "load_image"]
