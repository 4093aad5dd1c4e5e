"""Redundant parameters: those whose gradient is zero in exact arithmetic, which training leaves alone.

AdamW divides a gradient by its own running magnitude, so the roundoff left in such a gradient becomes an
lr-sized step, different between 1 and N processes (docs/distributed.md). Training therefore freezes them
(values kept) and the optimizer skips them. Where such a gradient is part of a tensor (the key and value
thirds of an attention's qkv bias), the attention's qkv is swapped for `QkvWithFrozenBias`, which stops
that part's gradient. `freeze_redundant_parameters(model)` applies both; the model's modules carry no
flags for it.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..layers import RelativeAttention2d
from ..layers.bf16_cpu import linear
from ..models import CoAtNet
from ..models.blocks import MBConvBlock, TransformerBlock


class QkvWithFrozenBias(nn.Linear):
    """An attention's qkv projection computing what the nn.Linear it replaces computes, with its weight and
    bias (the same Parameters, so the same state-dict keys), except that no gradient reaches the key third
    of the bias and, with `freeze_value`, the value third. The key bias cannot change the output: it adds
    q_i . b_k to every logit of row i, which the softmax ignores. The value bias cannot where the
    attention's output bias is redundant: softmax rows sum to one, so it only adds a constant to the
    output, which that output bias already is. Under bf16 autocast on a CPU that emulates bf16 it takes
    layers/bf16_cpu.py's kernels, as the Linear it replaces would."""

    def __init__(self, qkv: nn.Linear, freeze_value: bool):
        nn.Module.__init__(self)  # no new parameters: qkv's own
        self.in_features, self.out_features = qkv.in_features, qkv.out_features
        self.weight, self.bias = qkv.weight, qkv.bias
        self.freeze_value = freeze_value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.bias.chunk(3)  # the bias of q, k and v, each (attn_dim,)
        return linear(x, self.weight, torch.cat((q, k.detach(), v.detach() if self.freeze_value else v)))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, freeze_value={self.freeze_value}"


def redundant_parameters(model: nn.Module) -> set[str]:
    """Names of a CoAtNet's parameters whose gradient is zero in exact arithmetic (none for other models):
    the bias of an MBConv block's pre-norm BatchNorm, which the bias-free 1x1 convolution and the BatchNorm
    after it cancel, and the biases hidden by BatchNorm (`biases_hidden_by_batchnorm`)."""
    if not isinstance(model, CoAtNet):
        return set()
    pre_norm = {name for name, _ in model.named_parameters()
                if ".blocks." in name and name.endswith("pre_norm.bias")
                and isinstance(model.get_submodule(name.rsplit(".", 2)[0]), MBConvBlock)}
    return pre_norm | biases_hidden_by_batchnorm(model)


def freeze_redundant_parameters(model: nn.Module) -> list[str]:
    """Stop gradients that are zero in exact arithmetic, before training (values kept): `redundant_parameters`
    get requires_grad False, and every attention's qkv becomes a `QkvWithFrozenBias` (its value bias frozen
    where the attention's output bias is redundant). Returns the frozen parameters' names."""
    names = sorted(redundant_parameters(model))
    params = dict(model.named_parameters())
    for name in names:
        params[name].requires_grad_(False)
    for name, attn in model.named_modules():
        if isinstance(attn, RelativeAttention2d) and attn.qkv.bias is not None:
            attn.qkv = QkvWithFrozenBias(attn.qkv, freeze_value=f"{name}.proj.bias" in names)
    return names


def biases_hidden_by_batchnorm(model: CoAtNet) -> set[str]:
    """Biases that only add a per-channel constant to a residual stream whose every reader is a BatchNorm
    (the blocks' norms, the final norm) or a linear map into such a stream (the next stage's pooled,
    projected shortcut): the BatchNorms subtract the constant, so it never reaches the output. Walks back
    from the last stage while that holds. A stage's first shortcut bias always qualifies; a branch's output
    bias only without stochastic depth (dropping it per sample makes it vary)."""
    if not isinstance(model.norm, nn.BatchNorm2d):
        return set()
    names = []
    for index in reversed(range(len(model.stages))):
        stage_names = _stage_biases_hidden_by_batchnorm(model, index)
        if stage_names is None:
            break
        names += stage_names
    params = dict(model.named_parameters())
    return {n for n in names if n in params}


def _stage_biases_hidden_by_batchnorm(model: CoAtNet, index: int) -> list[str] | None:
    """Stage `index`'s biases that only shift its stream by a constant, or None when some reader of that
    stream is not a BatchNorm (the walk back stops there)."""
    stage_names = [f"stages.{index}.blocks.0.shortcut.bias"]
    for i, block in enumerate(model.stages[index].blocks):
        prefix = f"stages.{index}.blocks.{i}."
        if isinstance(block, TransformerBlock):
            if not (isinstance(block.norm1, nn.BatchNorm2d) and isinstance(block.norm2, nn.BatchNorm2d)):
                return None
            if block.drop_path1.rate == 0:
                stage_names.append(prefix + "attn.proj.bias")
                if math.prod(block.attn.feature_size) == 1:
                    # One token: q and k cannot change the output (the softmax is 1), so the norm's
                    # bias only reaches the values, whose constant the output bias already is.
                    stage_names.append(prefix + "norm1.bias")
            stage_names += [prefix + "mlp.fc2.bias"] * (block.drop_path2.rate == 0)
        elif isinstance(block, MBConvBlock) and isinstance(block.pre_norm, nn.BatchNorm2d) \
                and isinstance(block.pre_act, nn.Identity):
            stage_names += [prefix + "conv3.bias"] * (block.drop_path.rate == 0)
        else:
            return None
        if i > 0 and block.shortcut is not None:
            return None
    return stage_names
