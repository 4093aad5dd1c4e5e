"""Decoding image files with Pillow into 8-bit grayscale or RGB, whatever their mode; a file that cannot be
decoded raises UnreadableImageError saying why (Pillow's decompression-bomb guard stays on)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

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


class UnreadableImageError(ValueError):
    """A file that is not a decodable image: `reason` says why in a few words."""

    def __init__(self, path, reason: str):
        super().__init__(f"cannot read image {path}: {reason}")
        self.path, self.reason = path, reason


def _reason(path, error: Exception) -> str:
    if isinstance(path, (str, os.PathLike)):
        if os.path.isdir(path):
            return "a folder, not an image file"
        if os.path.isfile(path) and os.path.getsize(path) == 0:
            return "empty file"
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if isinstance(error, Image.DecompressionBombError):
        return f"refused by Pillow's decompression-bomb guard ({text})"
    if isinstance(error, UnidentifiedImageError):
        return "not an image file Pillow can decode"
    if isinstance(error, FileNotFoundError):
        return "no such file"
    if isinstance(error, OSError) and text:  # Pillow's own words: "image file is truncated", ...
        return text
    return f"{text} ({type(error).__name__})" if text else type(error).__name__


def load_image(path: str | os.PathLike, channels: int = 3) -> Image.Image:
    """Open `path` (or a binary file object) as an 8-bit image with `channels` channels (1: 'L', 3: 'RGB').

    Grayscale, palette, RGBA/LA (alpha dropped), CMYK and 16-bit images are converted. A file Pillow
    cannot decode (not an image, empty, truncated, too many pixels) raises UnreadableImageError."""
    if channels not in (1, 3):
        raise ValueError(f"channels={channels} must be 1 or 3")
    try:
        with Image.open(path) as img:
            img.load()
    except Exception as e:  # Pillow's decoders raise OSError, SyntaxError, EOFError, struct.error, ... on bad files
        raise UnreadableImageError(path, _reason(path, e)) from e
    img = to_8bit(img)
    if img.mode == "P":  # palette: expand through RGBA so a transparent index keeps its colour
        img = img.convert("RGBA")
    mode = "L" if channels == 1 else "RGB"
    return img if img.mode == mode else img.convert(mode)  # Pillow's convert to the same mode copies the pixels


def median_side(paths: Sequence[str | os.PathLike], limit: int = 256) -> int | None:
    """The median shorter side, in pixels, of up to `limit` of `paths` spread evenly over the list (headers
    only: Pillow reads no pixels); None when none of them opens."""
    step = max(1, len(paths) // limit)
    sides = []
    for path in list(paths)[::step][:limit]:
        try:
            with Image.open(path) as img:
                sides.append(min(img.size))
        except Exception:  # unreadable files are named when training meets them
            continue
    return sorted(sides)[len(sides) // 2] if sides else None


def fit_side(side: int, multiple: int) -> int:
    """`side` rounded to the nearest multiple of `multiple` (halves up), at least `multiple`: the input side a
    network whose total stride is `multiple` takes for images of that side."""
    return max(multiple, (side + multiple // 2) // multiple * multiple)


def images_under(folder: str | os.PathLike) -> list[str]:
    """The image files (by extension) anywhere under `folder`, sorted."""
    return sorted(str(p) for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def list_image_files(paths: Iterable[str | os.PathLike]) -> list[str]:
    """Files and folders -> files: a folder gives the image files under it (recursively, by extension,
    sorted), a file is kept whatever its name (reading it tells whether it is an image). Raises
    FileNotFoundError for a missing path and ValueError for a folder without images."""
    files: list[str] = []
    for path in map(str, paths):
        if os.path.isdir(path):
            found = images_under(path)
            if not found:
                raise ValueError(f"{path} is a folder with no image files in it ({', '.join(IMAGE_EXTENSIONS)})")
            files += found
        elif os.path.exists(path):
            files.append(path)
        else:
            raise FileNotFoundError(f"image not found: {path}")
    return files
