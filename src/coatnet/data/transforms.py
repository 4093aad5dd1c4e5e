"""Image transforms on uint8/float tensors, batched, with per-sample parameters from `data.random`.

Train: random resized crop and horizontal flip, RandAugment(n, m) (Cubuk et al. 2020), random erasing after
normalisation, then Mixup/CutMix and label smoothing on the targets. Eval: resize and center crop keeping
`crop_fraction` of the shorter side. Colour ops come from kornia.enhance; geometric ops are one affine warp per sample.

The batch-level steps (RandAugment, normalisation, random erasing, Mixup/CutMix) run on whatever device the
images are on, without reading anything back from it: the training engine copies uint8 batches to the accelerator and
augments them there. The only per-sample draws that need a distribution (Mixup's Beta) are made on the host
from the sample indices (`mix_params`) and travel with the batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .random import numpy_rng, uniform, uniform_streams

# Streams: independent random numbers per purpose (any distinct integers).
_S_CROP, _S_FLIP, _S_RA, _S_MIX, _S_ERASE, _S_SHIFT = 100, 200, 300, 400, 500, 600


@dataclass(frozen=True)
class AugmentConfig:
    """The random train-time augmentation; `enabled=False` turns all of it off."""

    enabled: bool = True  # False: train images get the eval transform, targets are one-hot
    crop_scale: tuple[float, float] = (0.08, 1.0)  # random resized crop: area fraction range
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # random resized crop: aspect ratio range
    hflip: float = 0.5  # probability of a horizontal flip
    # Random translation by a whole number of output pixels in -translate..translate along each axis, after the
    # crop; what leaves the image is zero (black): the pad-and-crop of CIFAR and Fashion-MNIST training. 0: off
    translate: int = 0
    randaugment_n: int = 0  # RandAugment: ops per image (paper: 2); 0 disables
    randaugment_m: float = 15.0  # RandAugment magnitude on the 0..30 scale (paper: 15)
    mixup_alpha: float = 0.0  # Beta(alpha, alpha) for Mixup (paper: 0.8); 0 disables
    cutmix_alpha: float = 0.0  # Beta(alpha, alpha) for CutMix; 0 disables
    cutmix_prob: float = 0.5  # when both are on: probability a sample uses CutMix rather than Mixup
    label_smoothing: float = 0.0  # (paper: 0.1)
    erase_prob: float = 0.0  # random erasing: probability per image (Zhong et al. 2020; not in the paper); 0 disables
    erase_scale: tuple[float, float] = (0.02, 1 / 3)  # random erasing: box area fraction range
    erase_ratio: tuple[float, float] = (0.3, 1 / 0.3)  # random erasing: box aspect ratio (h/w) range


# -- boxes ------------------------------------------------------------------------------------------
def random_crop_boxes(u: torch.Tensor, height: int | torch.Tensor, width: int | torch.Tensor,
                      scale: tuple[float, float], ratio: tuple[float, float]) -> torch.Tensor:
    """Random resized crop boxes from uniforms u (B, 4) of images height x width (each an int, or (B,) per image):
    (B, 4) float boxes (x0, y0, w, h) in pixels."""
    area = height * width * (scale[0] + (scale[1] - scale[0]) * u[:, 0])
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    aspect = torch.exp(log_r)
    w = _at_most(torch.sqrt(area * aspect).clamp_min(1.0), width)
    h = _at_most(torch.sqrt(area / aspect).clamp_min(1.0), height)
    return torch.stack([u[:, 2] * (width - w), u[:, 3] * (height - h), w, h], dim=1)


def _at_most(x: torch.Tensor, limit: int | torch.Tensor) -> torch.Tensor:
    return torch.minimum(x, limit.to(x.dtype)) if isinstance(limit, torch.Tensor) else x.clamp_max(limit)


def center_crop_box(height: int, width: int, crop_fraction: float, out_h: int, out_w: int) -> tuple:
    """Box (x0, y0, w, h) of the eval transform: a centred crop of the output's aspect ratio whose shorter
    side is `crop_fraction` of the image's shorter side (resize shorter side to out/crop_fraction, crop out)."""
    scale = min(height / out_h, width / out_w) * crop_fraction
    w, h = out_w * scale, out_h * scale
    return ((width - w) / 2, (height - h) / 2, w, h)


def crop_params(seed: int, epoch: int, index: torch.Tensor, height: int | torch.Tensor, width: int | torch.Tensor,
                aug: AugmentConfig, out_size: int) -> tuple:
    """Per-sample random-resized-crop boxes (B, 4), shifted by `aug.translate` pixels of the out_size x out_size
    output, and flip flags (B,) bool for samples `index`."""
    u = torch.stack([uniform(seed, epoch, index, _S_CROP + k) for k in range(4)], dim=1)
    boxes = random_crop_boxes(u, height, width, aug.crop_scale, aug.crop_ratio)
    if aug.translate:
        boxes = shift_boxes(boxes, seed, epoch, index, aug.translate, out_size)
    flips = uniform(seed, epoch, index, _S_FLIP) < aug.hflip
    return boxes, flips


def shift_boxes(boxes: torch.Tensor, seed: int, epoch: int, index: torch.Tensor, pixels: int, out_size: int
                ) -> torch.Tensor:
    """Boxes (B, 4) moved by whole output pixels, uniform in -pixels..pixels along x and y: a box of w source
    pixels resampled to out_size moves its output by k pixels when it moves by k * w / out_size."""
    k = torch.stack([(uniform(seed, epoch, index, _S_SHIFT + a) * (2 * pixels + 1)).floor().clamp_max(2 * pixels)
                     - pixels for a in range(2)], dim=1).to(boxes.dtype)
    step = boxes[:, 2:] / out_size
    return torch.cat([boxes[:, :2] + k * step, boxes[:, 2:]], dim=1)


def resized_crop(x: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int], flips: torch.Tensor | None = None,
                 outside: str = "border") -> torch.Tensor:
    """Crop boxes (B, 4) (x0, y0, w, h) out of x (B, C, H, W) float and resize them bilinearly to `size`,
    mirrored where `flips` (B,) is set: (B, C, *size). Samples outside the image take the nearest edge pixel
    (`outside="border"`) or zero ("zeros": boxes shifted past the edge, AugmentConfig.translate)."""
    b, _, height, width = x.shape
    x0, y0, w, h = boxes.to(device=x.device, dtype=x.dtype, non_blocking=True).unbind(1)
    sx = w / width
    if flips is not None:
        sx = torch.where(flips.to(x.device), -sx, sx)
    theta = torch.zeros(b, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0], theta[:, 0, 2] = sx, (2 * x0 + w) / width - 1
    theta[:, 1, 1], theta[:, 1, 2] = h / height, (2 * y0 + h) / height - 1
    grid = F.affine_grid(theta, [b, x.shape[1], *size], align_corners=False)
    # Downscaling by more than 2x aliases; smooth first (rare here: crops are resized near their own size).
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=outside, align_corners=False)


# -- RandAugment -----------------------------------------------------------------------------------
# Ops of RandAugment (Cubuk et al. 2020, Table 6 minus the no-op duplicates) with the magnitude at level 30.
RANDAUGMENT_OPS = ("identity", "autocontrast", "equalize", "rotate", "solarize", "color", "posterize",
                   "contrast", "brightness", "sharpness", "shear_x", "shear_y", "translate_x", "translate_y")
_MAX_LEVEL = 30.0


def _blend(img: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = factor.view(-1, 1, 1, 1)
    return (other + f * (img - other)).clamp(0, 1)


def _gray(img: torch.Tensor) -> torch.Tensor:
    if img.shape[1] == 1:
        return img
    w = _constant([0.299, 0.587, 0.114], img).view(1, 3, 1, 1)
    return (img * w).sum(1, keepdim=True).expand_as(img)


def _sharpness(img: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's ImageEnhance.Sharpness on img (b, C, H, W) in [0, 1] with per-sample factor (b,): the blend from
    a smoothed copy (3x3 kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13, clipped to [0, 1]) towards the image,
    border pixels kept. kornia.enhance.sharpness computes the same with a grouped conv2d; this sums the 3x3
    box as two separable 3-tap sums of slices, which on a CPU is several times faster (equal to ~1e-7)."""
    centre = img[..., 1:-1, 1:-1]
    rows = img[..., :-2, :] + img[..., 1:-1, :] + img[..., 2:, :]
    smooth = (rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]).add_(centre, alpha=4).div_(13).clamp_(0, 1)
    out = img.clone()
    out[..., 1:-1, 1:-1] = smooth.add_((centre - smooth).mul_(factor.view(-1, 1, 1, 1))).clamp_(0, 1)
    return out


def _posterize(img: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """PIL's ImageOps.posterize on img (b, C, H, W) in [0, 1] with per-sample bits (b,) in 1..8: the 8-bit level
    trunc(255 x) keeps its top `bits` bits; 8 bits leave the image as it is. The numbers of kornia's posterize
    (tested), in a quarter of its time on a CPU: one bitwise and instead of its float shifts."""
    mask = (256 - 2 ** (8 - bits)).to(torch.uint8).view(-1, 1, 1, 1)
    out = (img * 255).to(torch.uint8).bitwise_and_(mask).to(img.dtype).div_(255)
    return torch.where((bits == 8).view(-1, 1, 1, 1), img, out)


def _apply_color_op(op: str, img: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """One colour op on img (b, C, H, W) in [0, 1] with per-sample level (b,) in [0, 1] and sign (b,) +-1."""
    import kornia.enhance as KE

    if op == "autocontrast":
        lo = img.amin((2, 3), keepdim=True)
        hi = img.amax((2, 3), keepdim=True)
        return torch.where(hi > lo, (img - lo) / (hi - lo).clamp_min(1e-6), img)
    if op == "equalize":
        return KE.equalize(img)
    if op == "solarize":
        threshold = (1.0 - level).view(-1, 1, 1, 1)
        return torch.where(img >= threshold, 1.0 - img, img)
    if op == "posterize":
        return _posterize(img, (8 - torch.round(4 * level)).to(torch.int32))
    factor = 1.0 + 0.9 * level * sign
    if op == "color":
        return _blend(img, _gray(img), factor)
    if op == "contrast":
        return _blend(img, _gray(img).mean((1, 2, 3), keepdim=True).expand_as(img), factor)
    if op == "brightness":  # the blend from black: factor x img (the same numbers, one pass)
        return (img * factor.view(-1, 1, 1, 1)).clamp_(0, 1)
    if op == "sharpness":
        return _sharpness(img, factor.clamp_min(0))
    raise ValueError(op)


def _affine_for(op: str, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """(b, 2, 3) affine in normalised coordinates for a geometric op, on level's device."""
    b = level.shape[0]
    theta = torch.zeros(b, 2, 3, dtype=level.dtype, device=level.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    v = level * sign
    if op == "rotate":
        a = torch.deg2rad(30.0 * v)
        theta[:, 0, 0], theta[:, 0, 1] = torch.cos(a), -torch.sin(a)
        theta[:, 1, 0], theta[:, 1, 1] = torch.sin(a), torch.cos(a)
    elif op == "shear_x":
        theta[:, 0, 1] = 0.3 * v
    elif op == "shear_y":
        theta[:, 1, 0] = 0.3 * v
    elif op == "translate_x":
        theta[:, 0, 2] = 2 * 0.45 * v  # up to 45% of the width
    elif op == "translate_y":
        theta[:, 1, 2] = 2 * 0.45 * v
    return theta


_GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")


def affine_grid(theta: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """F.affine_grid(theta, (b, C, height, width), align_corners=False) to within 1e-6, as two broadcast
    multiply-adds per coordinate: torch's CPU kernel multiplies a (b, H*W, 3) base grid by theta with bmm,
    whose 3-long inner dimension runs 2.5x slower than this (at 224 px on one thread: 5.7 -> 2.3 ms for 8
    images), and RandAugment's geometric ops make one grid per op and layer."""
    b = theta.shape[0]
    xs = torch.arange(width, dtype=theta.dtype, device=theta.device).mul_(2).add_(1).div_(width).sub_(1)
    ys = torch.arange(height, dtype=theta.dtype, device=theta.device).mul_(2).add_(1).div_(height).sub_(1)
    t = theta.reshape(b, 6, 1, 1)
    gx = torch.addcmul(t[:, 2] + t[:, 1] * ys.view(1, height, 1), t[:, 0], xs.view(1, 1, width))
    gy = torch.addcmul(t[:, 5] + t[:, 4] * ys.view(1, height, 1), t[:, 3], xs.view(1, 1, width))
    return torch.stack([gx, gy], dim=-1)


def _apply_op(op: str, img: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """RandAugment op `op` on img (b, C, H, W) in [0, 1], per-sample level and sign (b,) on img's device."""
    if op in _GEOMETRIC:
        theta = _affine_for(op, level, sign)
        grid = affine_grid(theta, img.shape[2], img.shape[3])
        return F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return _apply_color_op(op, img, level, sign)


def rand_augment(img: torch.Tensor, seed: int, epoch: int, index: torch.Tensor, n: int, m: float,
                 gather: bool | None = None, inplace: bool = False) -> torch.Tensor:
    """RandAugment on img (B, C, H, W) float in [0, 1]: each sample applies `n` ops chosen uniformly from
    RANDAUGMENT_OPS at magnitude m (0..30 scale, random sign for signed ops). Returns a new tensor; with
    `inplace` (the caller owns img) img may be overwritten and returned instead (on the CPU it is: the same
    numbers without a copy of the batch).

    `index` (B,) may live on img's device. `gather` (default: on the CPU) runs each op on the samples that
    chose it; otherwise (default on an accelerator) every op runs on the whole batch and each sample keeps
    the result of its own op (torch.where): more arithmetic, which a GPU has spare, and no read-back of which
    samples chose what. Both give each sample the same result."""
    level = min(max(m / _MAX_LEVEL, 0.0), 1.0)
    out = img if inplace else img.clone()
    n_ops = len(RANDAUGMENT_OPS)
    gather = img.device.type == "cpu" if gather is None else gather
    index = index.to(img.device)
    for layer in range(n):
        choice = (uniform(seed, epoch, index, _S_RA + 2 * layer) * n_ops).long().clamp_max(n_ops - 1)
        sign = torch.where(uniform(seed, epoch, index, _S_RA + 2 * layer + 1) < 0.5, -1.0, 1.0).to(img.dtype)
        if not gather:
            for k, op in enumerate(RANDAUGMENT_OPS):
                if op != "identity":
                    chosen = (choice == k).view(-1, 1, 1, 1)
                    lv = torch.full_like(sign, level)
                    out = torch.where(chosen, _apply_op(op, out, lv, sign).to(out.dtype), out)
        else:
            for k, op in enumerate(RANDAUGMENT_OPS):
                sel = (choice == k).nonzero().flatten()
                if op != "identity" and sel.numel():
                    lv = torch.full((sel.numel(),), level, dtype=img.dtype)
                    out[sel] = _apply_op(op, out[sel], lv, sign[sel]).to(out.dtype)
    return out


# -- Random erasing --------------------------------------------------------------------------------
def erase_boxes(u: torch.Tensor, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float]
                ) -> torch.Tensor:
    """Random erasing boxes from uniforms u (B, 4): (B, 4) float (x0, y0, x1, y1) in whole pixels, of area
    `scale` x height x width and aspect ratio h/w in `ratio` (log-uniform), clipped to the image."""
    area = height * width * (scale[0] + (scale[1] - scale[0]) * u[:, 0])
    aspect = torch.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1])
    h = torch.sqrt(area * aspect).round().clamp(1, height)
    w = torch.sqrt(area / aspect).round().clamp(1, width)
    y0 = torch.floor(u[:, 2] * (height - h + 1))
    x0 = torch.floor(u[:, 3] * (width - w + 1))
    return torch.stack([x0, y0, x0 + w, y0 + h], dim=1)


def random_erase(img: torch.Tensor, seed: int, epoch: int, index: torch.Tensor, aug: AugmentConfig
                 ) -> torch.Tensor:
    """Random erasing (Zhong et al., AAAI 2020) on normalised images (B, C, H, W): each sample, with probability
    `aug.erase_prob`, has one box (`erase_boxes`) set to 0, the per-channel mean after normalisation. The draws
    are a function of (seed, epoch, sample index), made on index's device (nothing read back)."""
    if aug.erase_prob <= 0 or len(img) == 0:
        return img
    height, width = img.shape[-2:]
    u = uniform_streams(seed, epoch, index.to(img.device), [_S_ERASE + k for k in range(5)])
    boxes = erase_boxes(u[:, :4], height, width, aug.erase_scale, aug.erase_ratio)
    erase = (u[:, 4] < aug.erase_prob).view(-1, 1, 1, 1)
    return img.masked_fill(box_mask(boxes, height, width) & erase, 0.0)


def box_mask(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, 1, height, width) bool on boxes' device: True inside each sample's box (x0, y0, x1, y1), x1/y1 exclusive."""
    ys = torch.arange(height, device=boxes.device).view(1, -1, 1)
    xs = torch.arange(width, device=boxes.device).view(1, 1, -1)
    b = boxes.view(-1, 4, 1, 1)
    return ((xs >= b[:, 0]) & (xs < b[:, 2]) & (ys >= b[:, 1]) & (ys < b[:, 3])).unsqueeze(1)


# -- Mixup / CutMix and targets --------------------------------------------------------------------
@dataclass(frozen=True)
class MixParams:
    """Per-sample Mixup/CutMix draws of a batch of B samples (see `mix_params`)."""

    partner: torch.Tensor  # (B,) int64: the sample each one mixes with
    lam: torch.Tensor  # (B,) float32: weight of the sample itself (of its own label, too)
    cut: torch.Tensor  # (B,) bool: CutMix (a box pasted from the partner) rather than Mixup
    boxes: torch.Tensor  # (B, 4) float32: CutMix boxes (x0, y0, x1, y1) in pixels
    any_cut: bool  # whether any sample cuts (known on the host: no read-back to decide)

    def to(self, device: torch.device, non_blocking: bool = False) -> "MixParams":
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return MixParams(move(self.partner), move(self.lam), move(self.cut), move(self.boxes), self.any_cut)


def mix_params(seed: int, epoch: int, index: torch.Tensor, aug: AugmentConfig, height: int, width: int
               ) -> MixParams | None:
    """The Mixup/CutMix draws for samples `index` (B,) (host) of images height x width: a function of
    (seed, epoch, sample index) and the batch's pairing; None when `aug` mixes nothing. Sample j mixes
    with its neighbour j^1 of the batch (pairs (0,1), (2,3), ...; a trailing odd sample mixes with itself),
    with a per-sample Beta(alpha, alpha) weight, so a batch cut into slices at even offsets mixes identically."""
    use_mixup, use_cutmix = aug.mixup_alpha > 0, aug.cutmix_alpha > 0
    b = len(index)
    if not (use_mixup or use_cutmix) or b == 0:
        return None
    partner = (torch.arange(b) ^ 1).clamp_max(b - 1)
    lam = torch.ones(b)
    cut = torch.zeros(b, dtype=torch.bool)
    boxes = torch.zeros(b, 4)
    any_cut = False
    for j, i in enumerate(index.tolist()):
        rng = numpy_rng(seed, epoch, i, _S_MIX)
        is_cut = use_cutmix and (not use_mixup or rng.random() < aug.cutmix_prob)
        alpha = aug.cutmix_alpha if is_cut else aug.mixup_alpha
        lam_j = float(rng.beta(alpha, alpha))
        if is_cut:  # a box of area (1 - lam) from the partner; lam corrected to the clipped box
            cut[j] = any_cut = True
            ch, cw = height * math.sqrt(1 - lam_j), width * math.sqrt(1 - lam_j)
            cy, cx = rng.random() * height, rng.random() * width
            y0, y1 = int(max(cy - ch / 2, 0)), int(min(cy + ch / 2, height))
            x0, x1 = int(max(cx - cw / 2, 0)), int(min(cx + cw / 2, width))
            boxes[j] = torch.tensor([x0, y0, x1, y1], dtype=torch.float32)
            lam_j = 1 - (y1 - y0) * (x1 - x0) / (height * width)
        lam[j] = lam_j
    return MixParams(partner, lam, cut, boxes, any_cut)


def soft_targets(labels: torch.Tensor, num_classes: int, label_smoothing: float) -> torch.Tensor:
    """labels (B,) int64 -> smoothed one-hot targets (B, num_classes) float32, on labels' device."""
    onehot = torch.zeros(len(labels), num_classes, device=labels.device).scatter_(1, labels.view(-1, 1), 1.0)
    return onehot * (1 - label_smoothing) + label_smoothing / num_classes


def mix_batch(img: torch.Tensor, labels: torch.Tensor, num_classes: int, seed: int, epoch: int,
              index: torch.Tensor, aug: AugmentConfig, params: MixParams | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup/CutMix and label smoothing. img (B, C, H, W) float, labels (B,) int -> (images, soft targets
    (B, num_classes)) on img's device. The draws are `mix_params(seed, epoch, index, aug, H, W)`'s, or
    `params` when the caller made them already (on the host, before the images went to the device)."""
    targets = soft_targets(labels.to(img.device), num_classes, aug.label_smoothing)
    height, width = img.shape[-2:]
    if params is None:
        params = mix_params(seed, epoch, index.cpu(), aug, height, width)
    if params is None:
        return img, targets
    p = params.to(img.device, non_blocking=True)
    other = img.index_select(0, p.partner)
    pasted = None
    if p.any_cut:
        pasted = torch.where(box_mask(p.boxes, height, width), other, img)
    # lam * img + (1 - lam) * other in one pass (equal to ~1e-7; half the time of the written-out form on a CPU),
    # in place on the partner copy: no second image-sized allocation
    mixed = other.lerp_(img, p.lam.to(img.dtype).view(-1, 1, 1, 1))
    if pasted is not None:
        mixed = torch.where(p.cut.view(-1, 1, 1, 1), pasted, mixed)
    lam_t = p.lam.view(-1, 1)
    return mixed, lam_t * targets + (1 - lam_t) * targets[p.partner]


def to_unit_range(img: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1] (on their device); float images as they are."""
    return img.to(torch.float32).div_(255) if img.dtype == torch.uint8 else img


def normalize(img: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], inplace: bool = False
              ) -> torch.Tensor:
    """(B, C, H, W) uint8, or float in [0, 1] -> float standardised per channel, on img's device. `inplace`:
    a float img the caller owns is overwritten (the same numbers, no image-sized allocation)."""
    owned = inplace or img.dtype == torch.uint8
    img = to_unit_range(img)
    mean_t, std_t = _constant(mean, img).view(1, -1, 1, 1), _constant(std, img).view(1, -1, 1, 1)
    return (img.sub_(mean_t) if owned else img - mean_t).div_(std_t)


def _constant(values, like: torch.Tensor) -> torch.Tensor:
    """A few numbers as a tensor of like's dtype on like's device. Copied without waiting: a plain
    torch.tensor(..., device="cuda") waits for every kernel queued before it."""
    return torch.tensor(values, dtype=like.dtype).to(like.device, non_blocking=True)
