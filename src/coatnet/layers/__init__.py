"""Pure building blocks: relative attention, stochastic depth, squeeze-excite."""
from .drop_path import DropPath, drop_path
from .relative_attention import RelativeAttention2d, gather_bias, relative_position_index, resize_bias_table
from .squeeze_excite import SqueezeExcite

__all__ = [
    "DropPath", "drop_path", "RelativeAttention2d", "gather_bias", "relative_position_index",
    "resize_bias_table", "SqueezeExcite",
]
