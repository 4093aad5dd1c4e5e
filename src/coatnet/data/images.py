"""Decoding image files with Pillow into 8-bit grayscale or RGB, whatever their mode."""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")


def to_8bit(img: Image.Image) -> Image.Image:
    """16-bit ('I;16*'), 32-bit integer ('I') and float ('F') images scaled to 8-bit 'L'."""
    if img.mode.startswith("I;16") or img.mode == "I":
        arr = np.asarray(img, dtype=np.float64)
        # 16-bit files decode as 'I;16' or 'I'; values above 255 mean the 0..65535 range.
        scale = 257.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 1.0
        return Image.fromarray(np.clip(arr / scale + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 if arr.max(initial=0) <= 1.0 else 1.0
        return Image.fromarray(np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8), "L")
    return img


def load_image(path: str | os.PathLike, channels: int = 3) -> Image.Image:
    """Open `path` as an 8-bit image with `channels` channels (1: 'L', 3: 'RGB').

    Grayscale, palette, RGBA/LA (alpha dropped), CMYK and 16-bit images are converted."""
    if channels not in (1, 3):
        raise ValueError(f"channels={channels} must be 1 or 3")
    with Image.open(path) as img:
        img.load()
    img = to_8bit(img)
    if img.mode == "P":  # palette: expand through RGBA so a transparent index keeps its colour
        img = img.convert("RGBA")
    return img.convert("L" if channels == 1 else "RGB")
