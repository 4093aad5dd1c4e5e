"""Pure building blocks: relative attention and its position-bias plug-ins, stochastic depth,
squeeze-excite, layer scale."""
from .drop_path import DropPath, drop_path, drop_path_streams
from .layer_scale import LayerScale
from .position_bias import RelativePositionMlp, RelativePositionTable, gather_bias, relative_position_index
from .relative_attention import RelativeAttention2d
from .squeeze_excite import SqueezeExcite
from .table_resize import resize_table

__all__ = [
    "DropPath", "drop_path", "drop_path_streams", "LayerScale", "RelativeAttention2d", "RelativePositionMlp",
    "RelativePositionTable", "gather_bias", "relative_position_index", "resize_table",
    "SqueezeExcite",
]
