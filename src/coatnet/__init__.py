"""coatnet: CoAtNet (Dai, Liu, Le, Tan, 2021) as a library and command-line tool.

The names below are imported on first use (PEP 562), so that `coatnet --help` starts without loading torch;
`from coatnet import create_model` and `coatnet.create_model` work as usual."""
from .version import __version__

_MODEL_NAMES = ("CoAtNet", "CoAtNetConfig", "MBConvConfig", "TransformerConfig", "count_macs", "count_params",
                "create_model", "get_config", "inference_model", "list_models")
_SUBMODULES = ("models", "layers", "data", "train", "export", "bench", "study", "explain", "publish", "utils",
               "preprocess", "process_group")

__all__ = [*_MODEL_NAMES, "__version__"]


def __getattr__(name: str):
    import importlib

    if name in _MODEL_NAMES:
        value = getattr(importlib.import_module(".models", __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'coatnet' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_MODEL_NAMES, *_SUBMODULES})
