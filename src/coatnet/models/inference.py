"""`inference_model`: an eval-only copy of a CoAtNet prepared for speed, numerically equivalent.

- BatchNorm folded into the neighbouring convolution: the pre-norm BN of an MBConv block into its 1x1
  expansion (a per-channel affine before a 1x1 conv, exact even when that conv is strided or average
  pooling sits between; not when an activation follows the pre-norm), and the BNs after the expansion
  and the depthwise conv into those convs (not when squeeze-excite sits between); the stem's BN into
  its first conv.
- Relative-position bias gathered once into a (heads, N, N) buffer instead of at every call.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..layers import RelativeAttention2d
from .blocks import MBConvBlock, Stem
from .coatnet import CoAtNet


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) with bn(x) == x * scale + shift per channel, in eval mode."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


def fold_bn_after(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """conv followed by bn -> one conv."""
    scale, shift = _bn_affine(bn)
    fused = copy.deepcopy(conv)
    fused.weight = nn.Parameter(conv.weight * scale.reshape(-1, 1, 1, 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(shift)
    fused.bias = nn.Parameter(bias * scale + shift)
    return fused


def fold_bn_before(bn: nn.BatchNorm2d, conv: nn.Conv2d) -> nn.Conv2d:
    """bn followed by an unpadded 1x1 conv -> one conv (W(a x + b) = (W a) x + W b)."""
    assert conv.kernel_size == (1, 1) and conv.groups == 1
    scale, shift = _bn_affine(bn)
    fused = copy.deepcopy(conv)
    w = conv.weight[:, :, 0, 0]  # (out, in)
    fused.weight = nn.Parameter((w * scale[None, :])[:, :, None, None])
    bias = conv.bias if conv.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    fused.bias = nn.Parameter(bias + w @ shift)
    return fused


@torch.no_grad()
def inference_model(model: CoAtNet) -> CoAtNet:
    """A copy of `model` in eval mode with BatchNorm folded and attention biases gathered once.
    Outputs equal the original's to about 1e-5 relative; it cannot be trained."""
    model = copy.deepcopy(model).eval()
    for m in model.modules():
        if isinstance(m, MBConvBlock):
            # The pre-norm folds forward through average pooling (both linear), not through an activation.
            if isinstance(m.pre_act, nn.Identity):
                m.conv1, m.pre_norm = fold_bn_before(m.pre_norm, m.conv1), nn.Identity()
            m.conv1, m.norm1 = fold_bn_after(m.conv1, m.norm1), nn.Identity()
            if not m.se_before_norm:  # squeeze-excite between conv2 and norm2 blocks that fold
                m.conv2, m.norm2 = fold_bn_after(m.conv2, m.norm2), nn.Identity()
        elif isinstance(m, Stem):
            layers = list(m.layers)
            for i, layer in enumerate(layers[:-1]):
                if isinstance(layer, nn.Conv2d) and isinstance(layers[i + 1], nn.BatchNorm2d):
                    layers[i], layers[i + 1] = fold_bn_after(layer, layers[i + 1]), nn.Identity()
            m.layers = nn.Sequential(*layers)
        elif isinstance(m, RelativeAttention2d):
            m.freeze_bias()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
