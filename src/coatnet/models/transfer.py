"""Preparing a trained CoAtNet for fine-tuning (paper, Sec. 4: pre-train, then fine-tune at a higher
resolution or on a new label set): the depth of each parameter for layer-wise learning-rate decay,
optimizer groups that carry it, and freezing the first stages.
"""
from __future__ import annotations

import re

from torch import nn

from .coatnet import CoAtNet


def layer_depth(name: str, num_blocks: list[int]) -> int:
    """0 for the stem, 1.. for the blocks in order, then one more for everything after the last block
    (final norm, pre-logits, classifier). `num_blocks` holds the block count of each built stage."""
    if name.startswith("stem."):
        return 0
    m = re.match(r"stages\.(\d+)\.blocks\.(\d+)\.", name)
    if m:
        stage, block = int(m.group(1)), int(m.group(2))
        return 1 + sum(num_blocks[:stage]) + block
    return 1 + sum(num_blocks)


def layer_decay_groups(model: CoAtNet, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """AdamW parameter groups: a parameter at depth d of D (see layer_depth) gets lr_scale
    layer_decay ** (D - d), so the classifier learns at the full rate and the stem slowest; weight decay
    is 0 for the model's no_weight_decay() names. Frozen parameters (requires_grad False) are left out.
    Each group holds "params", "weight_decay", "lr_scale" and a "name"."""
    num_blocks = [len(stage.blocks) for stage in model.stages]
    deepest = 1 + sum(num_blocks)
    skip = model.no_weight_decay()
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        depth, decayed = layer_depth(name, num_blocks), name not in skip
        key = (depth, decayed)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": weight_decay if decayed else 0.0,
                           "lr_scale": layer_decay ** (deepest - depth),
                           "name": f"depth{depth}_{'decay' if decayed else 'no_decay'}"}
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def freeze_stages(model: CoAtNet, num_stages: int) -> list[str]:
    """Stop training the stem and the first `num_stages` built stages (0: nothing frozen): their
    parameters stop requiring gradients and their BatchNorms keep their statistics (eval mode, re-applied
    by `model.train()` through a hook). Returns the names of the frozen parameters."""
    if not 0 <= num_stages <= len(model.stages):
        raise ValueError(f"freeze_stages={num_stages} must be between 0 and {len(model.stages)} (the built stages)")
    if num_stages == 0:
        return []
    frozen_modules: list[nn.Module] = [model.stem, *model.stages[:num_stages]]
    for module in frozen_modules:
        for p in module.parameters():
            p.requires_grad_(False)
    prefixes = ("stem.",) + tuple(f"stages.{i}." for i in range(num_stages))
    names = [n for n, _ in model.named_parameters() if n.startswith(prefixes)]

    def keep_frozen_in_eval(module: nn.Module, args) -> None:
        for m in frozen_modules:
            m.eval()

    hook = getattr(model, "_freeze_hook", None)
    if hook is not None:
        hook.remove()
    model._freeze_hook = model.register_forward_pre_hook(keep_frozen_in_eval)
    for m in frozen_modules:
        m.eval()
    return names
