"""Training: TrainConfig, train(), evaluation, prediction, checkpoints and named recipes."""
from .config import TrainConfig
from .engine import NonFiniteLossError, train
from .evaluate import evaluate, evaluate_checkpoint
from .predict import predict_files
from .recipes import RECIPES, get_recipe, list_recipes

__all__ = ["TrainConfig", "train", "NonFiniteLossError", "evaluate", "evaluate_checkpoint", "predict_files",
           "RECIPES", "get_recipe", "list_recipes"]
