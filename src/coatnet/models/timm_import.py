"""Reading timm's CoAtNet checkpoints (timm.models.maxxvit state dicts) into our module names.

timm and we build the same stages (`stages.{i}.blocks.{j}`), so the mapping is per key name, plus:
- timm's Transformer blocks use 1x1 convolutions where ours use nn.Linear on channels-last maps: the
  (out, in, 1, 1) weights are reshaped to (out, in);
- timm's qkv output channels are ordered head by head (q, k, v of head 0, then head 1, ...), ours q of
  all heads, then k, then v: rows are permuted;
- timm stores a relative-position table as ((2H-1)(2W-1), heads), we as (heads, 2H-1, 2W-1): transposed
  and reshaped (a table of another size is then resized by the attention layer on load).
"""
from __future__ import annotations

import re

import torch

from ..layers import RelativeAttention2d

# (timm pattern, our replacement), applied in order to the part after "stages.{i}.blocks.{j}." or the
# whole key outside the stages.
_BLOCK_RENAMES = [
    (r"^shortcut\.expand\.", "shortcut."),
    (r"^conv1_1x1\.", "conv1."),
    (r"^conv2_kxk\.", "conv2."),
    (r"^conv3_1x1\.", "conv3."),
    (r"^se_early\.", "se."),
    (r"^norm1\.norm\.", "norm1."),
    (r"^attn\.rel_pos\.relative_position_bias_table$", "attn.position_bias.relative_bias_table"),
    (r"^attn\.rel_pos\.mlp\.", "attn.position_bias."),
]
_TOP_RENAMES = [
    (r"^stem\.conv1\.", "stem.layers.0."),
    (r"^stem\.norm1\.", "stem.layers.1."),
    (r"^stem\.conv2\.", "stem.layers.3."),
    (r"^head\.fc\.", "head."),
    (r"^head\.norm\.", "head_norm."),
    (r"^head\.pre_logits\.fc\.", "pre_logits.fc."),
]
_BLOCK_KEY = re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.(.*)$")


def is_timm_state_dict(state: dict[str, torch.Tensor]) -> bool:
    """True for a timm MaxxVit/CoAtNet state dict (its stem is `stem.conv1`, ours `stem.layers.0`)."""
    return "stem.conv1.weight" in state


def timm_key_to_ours(key: str, positions: list[list[str]] | None = None) -> str:
    """Our name for timm's `key`; `positions` (from _block_positions) renumbers the blocks of stages that
    timm keeps as one and we split in two."""
    m = _BLOCK_KEY.match(key)
    if m:
        stage, block, rest = int(m[1]), int(m[2]), m[3]
        for pattern, repl in _BLOCK_RENAMES:
            rest = re.sub(pattern, repl, rest)
        if positions is not None and stage < len(positions) and block < len(positions[stage]):
            return positions[stage][block] + rest
        return f"stages.{stage}.blocks.{block}.{rest}"
    for pattern, repl in _TOP_RENAMES:
        key = re.sub(pattern, repl, key)
    return key


def _qkv_rows_to_ours(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Rows ordered (head, q/k/v, d) -> (q/k/v, head, d); works for weights (3A, C) and biases (3A,)."""
    rest = t.shape[1:]
    return t.reshape(num_heads, 3, -1, *rest).transpose(0, 1).reshape(t.shape)


def _table_to_ours(table: torch.Tensor, num_heads: int, model_size: tuple[int, int]) -> torch.Tensor:
    """((2H-1)(2W-1), heads) -> (heads, 2H-1, 2W-1). The source map is taken as square unless its entry
    count cannot be, in which case it must be the model's own (as timm assumes)."""
    positions = table.shape[0]
    side = int(round(positions ** 0.5))
    if side * side == positions:
        grid = (side, side)
    else:
        grid = (2 * model_size[0] - 1, 2 * model_size[1] - 1)
        if grid[0] * grid[1] != positions:
            raise ValueError(f"cannot tell the map size of a relative-position table with {positions} entries")
    return table.T.reshape(num_heads, *grid)


def _block_positions(config) -> list[list[str]]:
    """For each of timm's stages, our "stages.{i}.blocks.{j}." prefix of each of its blocks. timm keeps a
    stage of mixed block types (its ('C', 'T') stages) as one stage; we build such a split stage as two."""
    stages, ours = [], 0
    for letters, depth in zip(config.layout.split("-"), config.depths[1:]):
        depths = depth if len(letters) == 2 else (depth,)
        stages.append([f"stages.{ours + part}.blocks.{j}." for part, d in enumerate(depths) for j in range(d)])
        ours += len(depths)
    return stages


def convert_timm_state_dict(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """timm's keys and layouts -> ours, for loading into `model` (a CoAtNet built from a timm variant's
    config). Keys we do not know pass through renamed as well as possible, so that the loader reports them."""
    attn = {name: m for name, m in model.named_modules() if isinstance(m, RelativeAttention2d)}
    own = model.state_dict()
    config = getattr(model, "config", None)
    positions = _block_positions(config) if config is not None and not config.is_vit else None
    out = {}
    for key, value in state.items():
        if key.endswith((".relative_position_index", ".rel_coords_log")):
            continue  # buffers derived from the map size (persistent in some older timm checkpoints)
        new = timm_key_to_ours(key, positions)
        if new.endswith(("attn.qkv.weight", "attn.qkv.bias")) and new.rsplit(".", 2)[0] in attn:
            heads = attn[new.rsplit(".", 2)[0]].num_heads
            value = _qkv_rows_to_ours(value.reshape(value.shape[0], -1) if value.ndim == 4 else value, heads)
        elif new.endswith("attn.position_bias.relative_bias_table") and new.rsplit(".", 2)[0] in attn \
                and value.ndim == 2:
            layer = attn[new.rsplit(".", 2)[0]]
            value = _table_to_ours(value, layer.num_heads, layer.feature_size)
        if new in own and value.ndim != own[new].ndim and value.ndim in (2, 4) and value.numel() == own[new].numel():
            value = value.reshape(own[new].shape)  # 1x1 conv <-> linear (timm saved both forms over time)
        out[new] = value
    return out
