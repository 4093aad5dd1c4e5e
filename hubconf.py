"""torch.hub entry points for a local clone (or GitHub): every registered model name, plus `create_model`.

    model = torch.hub.load("path/to/coatnet", "coatnet_0", source="local", num_classes=10)
    model = torch.hub.load("path/to/coatnet", "create_model", source="local", pretrained="path/to/hub-folder")

Keyword arguments are those of coatnet.create_model (config overrides, pretrained=, features_only=, ...).
"""
import os
import sys

dependencies = ["torch", "numpy", "PIL", "safetensors"]

_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "src")
if _SRC not in sys.path:  # a clone that is not pip-installed
    sys.path.insert(0, _SRC)

from coatnet import create_model, list_models  # noqa: E402


def _entry_point(name):
    def build(pretrained=None, **kwargs):
        return create_model(name, pretrained=pretrained, **kwargs)

    build.__name__ = name
    build.__doc__ = f"coatnet.create_model({name!r}, pretrained=None, **kwargs)"
    return build


for _name in list_models():
    globals()[_name] = _entry_point(_name)
del _name
