"""Parameter and multiply-add counts (the paper's FLOPs are multiply-adds)."""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from .coatnet import CoAtNet
from .config import CoAtNetConfig


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: CoAtNet, img_size: int | tuple[int, int] | None = None, batch: int = 1) -> int:
    """Multiply-adds of one forward pass per image (torch's counter counts 2 FLOPs per multiply-add).
    Runs on whatever device the model is on; a model on the meta device costs no compute."""
    size = model.config.image_size if img_size is None else (
        (img_size, img_size) if isinstance(img_size, int) else tuple(img_size))
    p = next(model.parameters())
    x = torch.zeros(batch, model.in_chans, *size, device=p.device, dtype=p.dtype)
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    model.train(was_training)
    return counter.get_total_flops() // 2 // batch


def build_on_meta(config: CoAtNetConfig) -> CoAtNet:
    """Build a model without allocating weights (for counting the multi-billion-parameter variants)."""
    with torch.device("meta"):
        return CoAtNet(config)
