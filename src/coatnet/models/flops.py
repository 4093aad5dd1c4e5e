"""Parameter and multiply-add counts (the paper's FLOPs are multiply-adds)."""
from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from ..utils import atomic_write
from .coatnet import CoAtNet
from .config import CoAtNetConfig

# Counts of the registered variants (3 channels, their own heads, at 224 and at their own size), so that
# `coatnet models` lists 37 models in a second instead of running each on the meta device (~0.5 s each,
# ~20 s on a busy 2-core machine). Keyed by a hash of the whole config: a changed variant misses the table
# and is counted afresh. Rewritten by scripts/count_models.py; tests/test_cli_models.py checks it is current.
COUNTS_FILE = Path(__file__).with_name("counts.json")


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


def conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, groups, output_mask, out_shape=None, **kwargs) -> int:
    """FLOPs of aten.convolution_backward. torch's own formula (torch 2.13) ignores `groups` in the weight
    gradient and counts it as a dense convolution's: `groups` times too many, 192x for a depthwise convolution
    over 192 channels, which made coatnet_mini's training step count 3.4x its true FLOPs. Each output channel's
    weight gradient sums over its group's input channels only, as the forward and the input gradient do. Given to
    FlopCounterMode as a custom_mapping (bench.count_step_flops), not registered like the attention formulas above:
    torch has a formula for this op, and replacing it would change every counter in the caller's process."""
    flops = 0
    if output_mask[0]:  # the input gradient: a transposed convolution of grad_out with the weight
        flops += flop_counter.conv_flop_count(grad_out_shape, w_shape, x_shape, not transposed)
    if output_mask[1]:  # the weight gradient: per group, a convolution of the input with grad_out
        count = (flop_counter.conv_flop_count(_swap01(grad_out_shape), _swap01(x_shape), _swap01(w_shape))
                 if transposed else
                 flop_counter.conv_flop_count(_swap01(x_shape), _swap01(grad_out_shape), _swap01(w_shape)))
        flops += count // groups
    return flops


def _swap01(shape) -> list[int]:
    return [shape[1], shape[0], *shape[2:]]


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


def config_key(config: CoAtNetConfig) -> str:
    """A hash of everything in `config` (architecture, in_chans, num_classes, img_size)."""
    return hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def _counts_table() -> dict:
    try:
        return json.loads(COUNTS_FILE.read_text())
    except (OSError, ValueError):  # no table (or a damaged one): everything is counted
        return {}


def model_counts(config: CoAtNetConfig) -> tuple[int, int]:
    """(parameters, multiply-adds per image at config.img_size) of the network `config` describes: from
    counts.json when it holds this exact config, else counted on the meta device."""
    hit = _counts_table().get(config_key(config))
    if hit is not None:
        return hit["params"], hit["macs"]
    model = build_on_meta(config)
    return count_params(model), count_macs(model)


def write_counts_table(configs: Iterable[tuple[str, CoAtNetConfig]], path: str | os.PathLike = COUNTS_FILE) -> int:
    """Count every (name, config) on the meta device and write the table `model_counts` reads; returns its size."""
    table = {}
    for name, config in configs:
        model = build_on_meta(config)
        table[config_key(config)] = {"model": name, "img_size": config.img_size, "in_chans": config.in_chans,
                                     "num_classes": config.num_classes, "params": count_params(model),
                                     "macs": count_macs(model)}
    with atomic_write(Path(path)) as tmp:
        tmp.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    _counts_table.cache_clear()
    return len(table)
