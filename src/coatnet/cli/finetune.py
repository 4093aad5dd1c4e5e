"""`coatnet finetune`: continue training a checkpoint at a new resolution or on a new label set."""
from __future__ import annotations

import argparse
import json

from .config_flags import add_config_flags

# The settings `coatnet finetune` takes flags for, in its --help order (the others keep the recipe's value).
FIELDS = ("data", "data_dir", "img_size", "epochs", "lr", "weight_decay", "ema_decay", "ema_warmup", "layer_decay",
          "freeze_stages", "recalibrate_bn", "val_fraction", "workers", "strict", "batch_size", "train_subset",
          "val_subset", "drop_path", "precision", "device", "channels_last", "threads", "seed", "out", "progress",
          "quiet", "log")

COMMANDS = {  # command: its line in `coatnet --help`
    "finetune": "fine-tune a checkpoint (ours or timm's) at a new size or on new labels",
}


def register(sub: argparse._SubParsersAction) -> None:
    from ..train.config import TrainConfig
    from ..train.recipes import FINETUNE_RECIPE

    d = TrainConfig()
    p = sub.add_parser("finetune", help=COMMANDS["finetune"],
                       description="Fine-tune a checkpoint. The defaults are the paper's fine-tuning settings (Sec. "
                                   "4.1): 30 epochs at a constant learning rate of 5e-5, weight decay 1e-8, an EMA "
                                   "of the weights (0.9999, warming up); the other settings as `coatnet train`'s.")
    p.add_argument("--checkpoint", required=True, help="weights to start from: a checkpoint of ours, timm's "
                                                       "(.safetensors/.pth/.bin), or a tag from `coatnet weights`")
    p.add_argument("--model", default=None, help="registered model (default: the one recorded in the checkpoint)")
    p.add_argument("--num-classes", type=int, default=None, help="class count of the new label set (checked "
                                                                 "against the data; a new head is made; "
                                                                 "default: the data's)")
    # The data, its split and the input size default to those of our checkpoint (finetune_config).
    add_config_flags(p, FIELDS, {**d.to_dict(), **FINETUNE_RECIPE}, grouped=False, shown={
        "data": "the data of our checkpoint, with its --data-dir and --val-fraction; else " + d.data,
        "data_dir": f"our checkpoint's; else {TrainConfig.settings()['data_dir'].none}",
        "val_fraction": f"our checkpoint's; else {d.val_fraction}",
        "img_size": "our checkpoint's; else as `coatnet train`"})
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..train.finetune import finetune_config
    from .train import train_noting_interruption
    from ..utils import plural, rounded

    settings = {k: v for k, v in vars(args).items()
                if k not in ("command", "func", "debug", "checkpoint", "model", "num_classes")}
    cfg = finetune_config(args.checkpoint, model=args.model, num_classes=args.num_classes, **settings)
    if not cfg.quiet:
        print(f"fine-tuning {cfg.pretrained} ({cfg.model}) on {cfg.data}: {plural(cfg.epochs, 'epoch')}, lr {cfg.lr}, "
              f"img_size {cfg.img_size or 'default'}, run folder {cfg.out or '-'}", flush=True)
    result = train_noting_interruption(cfg)
    print(json.dumps(rounded(result)))
    return 0
