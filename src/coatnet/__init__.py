"""coatnet: CoAtNet (Dai, Liu, Le, Tan, 2021) as a library and command-line tool."""
from .models import (CoAtNet, CoAtNetConfig, MBConvConfig, TransformerConfig, count_macs, count_params,
                     create_model, get_config, inference_model, list_models)

__version__ = "0.1.0"

__all__ = [
    "CoAtNet", "CoAtNetConfig", "MBConvConfig", "TransformerConfig", "count_macs", "count_params",
    "create_model", "get_config", "inference_model", "list_models", "__version__",
]
