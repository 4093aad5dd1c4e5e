"""How much GPU memory training a variant needs per GPU, computed on the meta device (no weights allocated).

Parts, per GPU, for AdamW with float32 master weights and bf16 compute:
- weights, gradients, optimizer states: 4 + 4 + 8 bytes per parameter; divided by the number of GPUs
  under FSDP (each holds a 1/N shard), whole on every GPU under DDP;
- gathered weights (FSDP only): a block's bf16 weights are all-gathered before its forward and backward,
  and the next block's are prefetched, so two of the largest block are whole at a time;
- activations: the tensors autograd saves for backward, measured by running the forward on meta tensors
  of the real shapes in bf16 and summing what the saved-tensor hooks see. With activation checkpointing a
  block keeps only its input until backward recomputes it, so the peak is every block's input plus the
  largest single block's saved tensors (plus the stem and head, which are not checkpointed).
Not counted: the CUDA context (~0.5 GiB), allocator fragmentation, communication buffers, temporary
workspace of kernels (attention, convolution); budget 10-20 % on top.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..models import get_config
from ..models.flops import build_on_meta

GIB = 2**30


@dataclass(frozen=True)
class MemoryEstimate:
    """Memory per GPU of one training step, in GiB."""

    model: str  # registered variant name
    params: int  # parameters of the whole model
    img_size: int  # input side
    batch_per_gpu: int  # images per GPU per forward
    gpus: int  # processes (GPUs) the model is data-parallel over
    fsdp: bool  # weights, gradients and optimizer states sharded over the GPUs
    checkpointing: bool  # each block's activations recomputed in backward
    weights: float  # float32 master weights held by this GPU
    gradients: float  # float32 gradients held by this GPU
    optimizer: float  # AdamW's two float32 moments held by this GPU
    gathered_weights: float  # bf16 whole weights of the blocks being computed (FSDP), else bf16 copies (DDP)
    activations: float  # tensors saved for backward, bf16
    total: float  # sum of the above

    def to_dict(self) -> dict:
        return asdict(self)


def _saved_bytes_per_block(model: nn.Module, x: torch.Tensor) -> tuple[list[int], list[int], int]:
    """Run `model(x)` (on meta) recording the bytes autograd saves for backward. Returns per block (in order)
    the bytes its forward saves and the bytes of its input, and the bytes saved outside the blocks. Parameter
    storages are left out (counted as weights), and a storage saved twice is counted once."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    blocks = [b for stage in model.stages for b in stage.blocks]
    saved: list[dict[int, int]] = [dict() for _ in range(len(blocks) + 1)]  # last: outside the blocks
    inputs = [0] * len(blocks)
    current = [len(blocks)]

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in params:
            saved[current[0]][storage._cdata] = storage.nbytes()
        return t

    def enter(i):
        def hook(module, args):
            current[0] = i
            inputs[i] = args[0].numel() * args[0].element_size()
        return hook

    def leave(module, args, output):
        current[0] = len(blocks)

    handles = []
    for i, b in enumerate(blocks):
        handles.append(b.register_forward_pre_hook(enter(i)))
        handles.append(b.register_forward_hook(leave))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
    finally:
        for h in handles:
            h.remove()
    per_block = [sum(d.values()) for d in saved[:-1]]
    return per_block, inputs, sum(saved[-1].values())


def estimate_training_memory(model_name: str, img_size: int = 224, batch_per_gpu: int = 32, gpus: int = 8,
                             fsdp: bool = True, checkpointing: bool = True,
                             num_classes: int = 1000) -> MemoryEstimate:
    """Memory per GPU to train `model_name` with AdamW, bf16 compute and float32 master weights."""
    if gpus < 1 or batch_per_gpu < 1:
        raise ValueError("gpus and batch_per_gpu must be positive")
    cfg = get_config(model_name, img_size=img_size, num_classes=num_classes)
    model = build_on_meta(cfg).to(torch.bfloat16).train()
    params = sum(p.numel() for p in model.parameters())
    x = torch.empty(batch_per_gpu, cfg.in_chans, img_size, img_size, device="meta", dtype=torch.bfloat16)
    per_block, inputs, outside = _saved_bytes_per_block(model, x)
    if checkpointing:
        activations = sum(inputs) + max(per_block) + outside
    else:
        activations = sum(per_block) + outside
    shards = gpus if fsdp else 1
    blocks = [b for stage in model.stages for b in stage.blocks]
    largest_block = max(sum(p.numel() for p in b.parameters()) for b in blocks)
    # FSDP: two blocks' bf16 weights whole at once; DDP: autocast keeps bf16 copies of all weights.
    gathered = 2 * 2 * largest_block if fsdp else 2 * params
    parts = dict(weights=4 * params / shards, gradients=4 * params / shards, optimizer=8 * params / shards,
                 gathered_weights=gathered, activations=activations)
    parts = {k: v / GIB for k, v in parts.items()}
    return MemoryEstimate(model=model_name, params=params, img_size=img_size, batch_per_gpu=batch_per_gpu,
                          gpus=gpus, fsdp=fsdp, checkpointing=checkpointing, total=sum(parts.values()), **parts)
