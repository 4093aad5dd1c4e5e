"""Resizing a relative-position table (heads, 2H-1, 2W-1) to the offsets of another map size.

- "bilinear": the table as an image, bilinearly resized (offsets evenly spaced at both sizes).
- "geometric": timm's rule for its CoAtNet checkpoints (from BEiT, Bao et al. 2021): the source
  entries keep unit spacing near offset 0 and spread out geometrically towards the edges so that the
  outermost source entry lands on the outermost target offset; target offsets are then linearly
  interpolated between their neighbouring source entries (clamped at the ends). Reproducing it lets a
  timm checkpoint loaded at another resolution give timm's outputs.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F


def _geometric_positions(src: int, dst: int) -> torch.Tensor:
    """Positions of `src` (odd) table entries: 0, then +-(1, 1+q, 1+q+q^2, ...), with q found by
    bisection in [1.01, 1.5] so that the last one reaches about dst // 2."""
    n, target = src // 2, dst // 2
    lo, hi, q = 1.01, 1.5, 0.0
    while hi - lo > 1e-6:
        q = (lo + hi) / 2
        if (1 - q ** n) / (1 - q) > target:  # sum of q^0 .. q^(n-1)
            hi = q
        else:
            lo = q
    steps: List[float] = []
    pos = 1.0
    for i in range(n):
        steps.append(pos)
        pos += q ** (i + 1)
    return torch.tensor([-steps[n - 1 - i] for i in range(n)] + [0.0] + steps)


def _linear_weights(src_pos: torch.Tensor, dst: int) -> torch.Tensor:
    """(dst, src) matrix interpolating values at `src_pos` linearly onto the integer offsets
    -dst//2 .. dst//2, holding the end values beyond the ends."""
    x = torch.arange(-(dst // 2), dst // 2 + 1, dtype=torch.float32).clamp(src_pos[0], src_pos[-1])
    right = torch.searchsorted(src_pos, x).clamp(1, len(src_pos) - 1)
    left = right - 1
    frac = (x - src_pos[left]) / (src_pos[right] - src_pos[left])
    w = torch.zeros(dst, len(src_pos))
    rows = torch.arange(dst)
    w[rows, left] += 1 - frac
    w[rows, right] += frac
    return w


def resize_table(table: torch.Tensor, size: Tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Resize a (heads, 2H-1, 2W-1) table to the offsets of an H' x W' map."""
    target = [2 * size[0] - 1, 2 * size[1] - 1]
    if table.shape[-2] == target[0] and table.shape[-1] == target[1]:
        return table
    if mode == "bilinear":
        return F.interpolate(table[None], size=target, mode="bilinear", align_corners=False)[0]
    if mode != "geometric":
        raise ValueError("table_resize='" + mode + "' is not one of 'bilinear', 'geometric'")
    wy = _linear_weights(_geometric_positions(table.shape[-2], target[0]), target[0])
    wx = _linear_weights(_geometric_positions(table.shape[-1], target[1]), target[1])
    wy, wx = wy.to(table.device), wx.to(table.device)
    return (wy @ table.float() @ wx.T).to(table.dtype)
