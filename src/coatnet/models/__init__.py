"""CoAtNet models: configuration, blocks, network, named variants, weights and inference preparation."""
from .coatnet import CoAtNet
from .config import CoAtNetConfig, MBConvConfig, TransformerConfig
from .flops import build_on_meta, count_macs, count_params, model_counts
from .inference import inference_model
from .variants import create_model, describe_model, get_config, list_models
from . import timm_variants  # noqa: F401,I001  (registers timm's CoAtNet names; after .variants)

__all__ = [
    "CoAtNet", "CoAtNetConfig", "MBConvConfig", "TransformerConfig", "build_on_meta", "count_macs",
    "count_params", "inference_model", "create_model", "describe_model", "get_config", "list_models", "model_counts",
]
