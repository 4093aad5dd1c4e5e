"""Training: TrainConfig, train(), evaluation, prediction, checkpoints and named recipes.

The names below are imported on first use (PEP 562), as the package root's are: `coatnet.train.config` and
`coatnet.train.recipes` load without torch, so that `coatnet train --help` reads the settings in a fraction of a
second; `from coatnet.train import train` works as usual. (`evaluate` is not among them: the name is its module's,
`coatnet.train.evaluate`, whose `evaluate` function scores a model.)"""
import importlib

_NAMES = {"TrainConfig": "config", "train": "engine", "NonFiniteLossError": "epoch",
          "evaluate_checkpoint": "evaluate", "predict_files": "predict", "RECIPES": "recipes",
          "get_recipe": "recipes", "list_recipes": "recipes"}

__all__ = list(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        value = getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'coatnet.train' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_NAMES})
