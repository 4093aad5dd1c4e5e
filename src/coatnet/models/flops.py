"""Parameter and multiply-add counts (the paper's FLOPs are multiply-adds)."""
from __future__ import annotations

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from .coatnet import CoAtNet
from .config import CoAtNetConfig


# torch's fused CPU attention kernels have no FLOP formula, so a model on the CPU counted its attention as
# free (coatnet_0: 3.99 GMACs against 4.14 on the meta device, whose attention runs as matmuls). They do the
# matmuls of the other fused kernels: give them those kernels' formulas.
def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                         **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


for _op, _formula in ((torch.ops.aten._scaled_dot_product_flash_attention_for_cpu, _sdpa_flops),
                      (torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward, _sdpa_backward_flops)):
    if _op not in flop_counter.flop_registry:
        flop_counter.register_flop_formula(_op)(_formula)


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
