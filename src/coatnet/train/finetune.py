"""Fine-tuning a trained CoAtNet (paper, Sec. 4): continue from a checkpoint at a higher resolution or on
a new label set, with the paper's fine-tuning recipe as defaults: 30 epochs, constant learning rate
5e-5, weight decay 1e-8, EMA of the weights (0.9999). The engine is `train()`; this module only picks
the model from the checkpoint and the settings."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..data import build_data
from ..models.hub import is_hub_id
from ..models.pretrained import weights_of
from ..utils import no_such_path
from .checkpoint import checkpoint_info
from .config import TrainConfig
from .engine import check_model
from .recipes import FINETUNE_RECIPE


def checkpoint_run(checkpoint: str) -> dict:
    """The run settings recorded in one of our training checkpoints ({"model", "layout", ...}); {} for others."""
    path = Path(checkpoint)
    if path.suffix != ".safetensors" or not path.is_file():
        return {}
    try:
        return dict(checkpoint_info(path)["run"])
    except (ValueError, KeyError, TypeError):  # not ours, damaged, or no run recorded: the caller names the model
        return {}


def checkpoint_model_name(checkpoint: str) -> str | None:
    """The registered model name recorded in one of our training checkpoints; None for other files."""
    return checkpoint_run(checkpoint).get("model")


def finetune_config(checkpoint: str, model: str | None = None, num_classes: int | None = None,
                    **settings: Any) -> TrainConfig:
    """TrainConfig that fine-tunes `checkpoint` (ours, timm's, or a tag from `coatnet weights`):
    FINETUNE_RECIPE, then `settings` (TrainConfig fields). Here, as for `model` and `num_classes`, None means
    "not given": the recipe's or the checkpoint's value (TrainConfig.replace sets a None). The model is the
    one recorded in the checkpoint, or `model` (needed for files without our metadata). Without `data`, one of
    our checkpoints continues on the data it was trained on (its data, data_dir and val_fraction) and, without
    `img_size`, at its size. `num_classes`, when given, must be the data's class count (a new head is made
    whenever it differs from the checkpoint's)."""
    settings = {k: v for k, v in settings.items() if v is not None}
    run = checkpoint_run(checkpoint)
    published = weights_of(checkpoint)  # a tag, or a file named after one: its model is known
    if not (run or published or is_hub_id(checkpoint) or os.path.exists(checkpoint)):
        raise no_such_path(checkpoint, "--checkpoint")  # a typo in the path, not a missing model name
    name = model or run.get("model") or (published.model if published else None)
    if name is None:
        raise ValueError(f"{checkpoint}: no model name recorded in it; pass the model (--model NAME)")
    for key in ("layout", "model_args"):  # the architecture it was trained with
        if model is None and run.get(key) and settings.get(key) is None:
            settings[key] = run[key]
    if settings.get("data") is None:  # one of our checkpoints: by default its own data, split and size
        for key in ("data", "data_dir", "val_fraction"):
            if settings.get(key) is None and run.get(key) is not None:
                settings[key] = run[key]
        if settings.get("img_size") is None and run.get("data") is not None:
            settings["img_size"] = checkpoint_info(checkpoint).get("data", {}).get("img_size")
    cfg = TrainConfig().replace(**FINETUNE_RECIPE, model=name, pretrained=str(checkpoint), eval_before=True,
                                recipe="finetune").replace(**settings)
    if num_classes is not None:
        classes = len(build_data(cfg.data, cfg.data_dir, cfg.val_fraction, cfg.img_size, cfg.crop_fraction,
                                 cfg.seed)[2].classes)
        if classes != num_classes:
            raise ValueError(f"--num-classes {num_classes}: the data {cfg.data!r} has {classes} classes")
    cfg = cfg.validate()
    check_model(cfg)  # an unknown model, a bad layout or size: named before any data is read
    return cfg
