"""coatnet: CoAtNet (Dai, Liu, Le, Tan, 2021) as a library and command-line tool."""
from .models import (CoAtNet, CoAtNetConfig, MBConvConfig, TransformerConfig, count_macs, count_params,
                     create_model, get_config, inference_model, list_models)

from .version import __version__

__all__ = [
    "CoAtNet", "CoAtNetConfig", "MBConvConfig", "TransformerConfig", "count_macs", "count_params",
    "create_model", "get_config", "inference_model", "list_models", "__version__",
]


def __getattr__(name: str):
    """coatnet.explain and coatnet.publish, imported on first use (they are not needed to build models)."""
    if name in ("explain", "publish"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'coatnet' has no attribute {name!r}")
