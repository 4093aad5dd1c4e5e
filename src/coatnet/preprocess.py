"""What a decoded image becomes before the network sees it, shared by data/ (our datasets and checkpoints)
and models/pretrained.py (the recipes of published weights): the normalisation constants, PIL image ->
uint8 tensor, one resampling of a crop box, and timm's eval transform.

Evaluation resizes the shorter side to size / crop fraction and keeps the centred size x size square. Two
roundings of that one rule exist, each kept for the numbers that were measured with it:
- ours (`coatnet.data.datasets.eval_image`): the exact centred box (`data.transforms.center_crop_box`),
  resampled once by `resize_crop`; in-memory datasets take the same box through a batched grid_sample;
- timm's (`EvalTransform`, how published weights were evaluated): the whole image resized to
  floor(size / crop_pct) pixels on its shorter side (or on both, "squash"), then whole pixels cropped, as
  timm does, so that accuracy matches timm's published numbers. The two differ by a grey level here and there.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL image ('L' or 'RGB') -> uint8 (C, H, W)."""
    arr = torch.from_numpy(np.array(img, dtype=np.uint8))
    arr = arr.unsqueeze(0) if arr.ndim == 2 else arr.permute(2, 0, 1)
    return arr.contiguous()


def resize_crop(img: Image.Image, box, size: int, flip: bool = False) -> torch.Tensor:
    """The float box (x0, y0, w, h) of `img` resampled bilinearly to size x size in one pass (no rounding
    of an intermediate size), mirrored when `flip`: uint8 (C, size, size). Where the box leaves the image
    (a translated crop) the image is taken as surrounded by zeros."""
    x0, y0, w, h = box
    pad = math.ceil(max(0.0, -x0, -y0, x0 + w - img.width, y0 + h - img.height))
    if pad:  # Pillow resamples only boxes inside the image
        img, x0, y0 = ImageOps.expand(img, border=pad, fill=0), x0 + pad, y0 + pad
    img = img.resize((size, size), Image.BILINEAR, box=(x0, y0, x0 + w, y0 + h))
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return to_tensor(img)


class EvalTransform:
    """PIL image -> normalised (3, size, size) float tensor, the way timm evaluated its published weights:
    resize (shorter side, or both sides for "squash") to size / crop_pct, centre-crop, scale to [0, 1],
    subtract mean, divide by std."""

    def __init__(self, size: int, crop_pct: float, crop_mode: str, interpolation: str,
                 mean: tuple[float, float, float], std: tuple[float, float, float]):
        self.size, self.crop_pct, self.crop_mode = size, crop_pct, crop_mode
        self.interpolation, self.mean, self.std = interpolation, mean, std

    def __call__(self, image) -> torch.Tensor:
        x = self.resize_crop(image).to(torch.float32) / 255.0
        return (x - torch.tensor(self.mean)[:, None, None]) / torch.tensor(self.std)[:, None, None]

    def resize_crop(self, image) -> torch.Tensor:
        """The geometric part: PIL image -> uint8 (3, size, size), before scaling and normalisation."""
        resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[self.interpolation]
        image = image.convert("RGB")
        scaled = int(self.size / self.crop_pct)  # timm's math.floor
        w, h = image.size
        if self.crop_mode == "squash":
            new = (scaled, scaled)
        elif w <= h:
            new = (scaled, int(scaled * h / w))
        else:
            new = (int(scaled * w / h), scaled)
        image = image.resize(new, resample)
        left, top = round((new[0] - self.size) / 2), round((new[1] - self.size) / 2)
        return to_tensor(image.crop((left, top, left + self.size, top + self.size)))

    def __repr__(self) -> str:
        return (f"EvalTransform(size={self.size}, crop_pct={self.crop_pct}, crop_mode={self.crop_mode!r}, "
                f"interpolation={self.interpolation!r}, mean={self.mean}, std={self.std})")
