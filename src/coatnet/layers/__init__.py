"""Pure building blocks: relative attention, stochastic depth, squeeze-excite."""
from .drop_path import DropPath, drop_path, drop_path_noise
from .relative_attention import RelativeAttention2d, gather_bias, relative_position_index, resize_bias_table
from .squeeze_excite import SqueezeExcite

__all__ = [
    "DropPath", "drop_path", "drop_path_noise", "RelativeAttention2d", "gather_bias", "relative_position_index",
    "resize_bias_table", "SqueezeExcite",
]
