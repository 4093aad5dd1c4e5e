"""`coatnet finetune`: continue training a checkpoint at a new resolution or on a new label set."""
from __future__ import annotations

import argparse
import json

from . import state_defaults

S = argparse.SUPPRESS

COMMANDS = {  # command: its line in `coatnet --help`
    "finetune": "fine-tune a checkpoint (ours or timm's) at a new size or on new labels",
}


def register(sub: argparse._SubParsersAction) -> None:
    from ..train.config import TrainConfig
    from ..train.recipes import FINETUNE_RECIPE as R
    from .train import TRAIN_NONE_MEANS

    defaults = {**TrainConfig().to_dict(), **R}  # what a flag left out becomes
    p = sub.add_parser("finetune", help=COMMANDS["finetune"])
    p.add_argument("--checkpoint", required=True, help="weights to start from: a checkpoint of ours, timm's "
                                                       "(.safetensors/.pth/.bin), or a tag from `coatnet weights`")
    p.add_argument("--model", default=None, help="registered model (default: the one recorded in the checkpoint)")
    p.add_argument("--data", default=S, help="'fashion-mnist' or an ImageFolder root (default: the data of our "
                                             "checkpoint, with its --data-dir and --val-fraction)")
    p.add_argument("--data-dir", default=S, help="folder of the Fashion-MNIST IDX files")
    p.add_argument("--img-size", type=int, default=S, help="input side; relative-position tables are resized "
                                                           "(default: our checkpoint's; else as `coatnet train`)")
    p.add_argument("--num-classes", type=int, default=None, help="class count of the new label set (checked "
                                                                 "against the data; a new head is made; "
                                                                 "default: the data's)")
    p.add_argument("--epochs", type=int, default=S, help=f"default {R['epochs']} (paper)")
    p.add_argument("--lr", type=float, default=S, help=f"constant learning rate (default {R['lr']}, paper)")
    p.add_argument("--weight-decay", type=float, default=S, help=f"default {R['weight_decay']} (paper)")
    p.add_argument("--ema-decay", type=float, default=S, help=f"EMA of the weights, evaluated and saved (default "
                                                               f"{R['ema_decay']}, paper; 0: off)")
    p.add_argument("--ema-warmup", action=argparse.BooleanOptionalAction, default=S,
                   help="EMA decay min(--ema-decay, (1+t)/(10+t)) at step t, so that a short run's average moves "
                        f"(default {'on' if R['ema_warmup'] else 'off'})")
    p.add_argument("--layer-decay", type=float, default=S, help="layer-wise lr decay per block (default 1: off)")
    p.add_argument("--freeze-stages", type=int, default=S, help="keep the stem and the first N stages fixed")
    p.add_argument("--recalibrate-bn", type=int, default=S, metavar="N",
                   help="before the first step: re-estimate the BatchNorm statistics on N training images at "
                        "the new size (eval transform, no labels; default 0: off)")
    p.add_argument("--val-fraction", type=float, default=S, help="held-out share of a folder without val/")
    p.add_argument("--workers", type=int, default=S, help="DataLoader workers for image folders")
    p.add_argument("--strict", action="store_const", const=True, default=S, help="fail on an unreadable image")
    p.add_argument("--batch-size", type=int, default=S)
    p.add_argument("--train-subset", type=int, default=S, metavar="N")
    p.add_argument("--val-subset", type=int, default=S, metavar="N")
    p.add_argument("--drop-path", type=float, default=S)
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=S)
    p.add_argument("--device", default=S)
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=S,
                   help="NHWC memory format for the convolutions "
                        f"(default {'on' if defaults['channels_last'] else 'off'})")
    p.add_argument("--threads", type=int, default=S)
    p.add_argument("--seed", type=int, default=S)
    p.add_argument("--out", default=S, help="run folder (default: none, nothing written)")
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False, default=S,
                   help="no progress bar (there is none when stderr is not a terminal)")
    p.add_argument("--quiet", action="store_const", const=True, default=S, help="no per-epoch lines")
    p.add_argument("--log", default=S, metavar="TRACKER", help="also log to tensorboard, wandb or both (see "
                                                               "`coatnet train --help`)")
    p.set_defaults(func=run)
    state_defaults(p, defaults, TRAIN_NONE_MEANS)


def run(args: argparse.Namespace) -> int:
    from ..train import train
    from ..train.engine import interrupted_note
    from ..train.finetune import finetune_config
    from ..utils import plural, rounded

    settings = {k: v for k, v in vars(args).items()
                if k not in ("command", "func", "debug", "checkpoint", "model", "num_classes")}
    cfg = finetune_config(args.checkpoint, model=args.model, num_classes=args.num_classes, **settings)
    if not cfg.quiet:
        print(f"fine-tuning {cfg.pretrained} ({cfg.model}) on {cfg.data}: {plural(cfg.epochs, 'epoch')}, lr {cfg.lr}, "
              f"img_size {cfg.img_size or 'default'}, run folder {cfg.out or '-'}", flush=True)
    try:
        result = train(cfg)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(interrupted_note(cfg.out)) from None
    print(json.dumps(rounded(result)))
    return 0
