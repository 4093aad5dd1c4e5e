"""Training: TrainConfig, train(), evaluation, prediction, checkpoints and named recipes.

The names below are imported on first use (PEP 562), as the package root's are: `coatnet.train.config` and
`coatnet.train.recipes` load without torch, so that `coatnet train --help` reads the settings in a fraction of a
second; `from coatnet.train import train` works as usual. (`evaluate` is not among them: the name is its module's,
`coatnet.train.evaluate`, whose `evaluate` function scores a model.)"""
from ..utils import lazy_exports

_NAMES = {"TrainConfig": "config", "train": "engine", "NonFiniteLossError": "epoch",
          "evaluate_checkpoint": "evaluate", "predict_files": "predict", "RECIPES": "recipes",
          "get_recipe": "recipes", "list_recipes": "recipes"}

__all__ = list(_NAMES)


__getattr__, __dir__ = lazy_exports(__name__, _NAMES)
