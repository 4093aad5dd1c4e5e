"""`coatnet models`: the registered variants with their parameters and multiply-adds."""
from __future__ import annotations

import argparse
import json

COMMANDS = {  # command: its line in `coatnet --help`
    "models": "list the model variants with parameters and multiply-adds",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help=COMMANDS["models"],
                       description="List every registered model with its parameters and multiply-adds per image. "
                                   "Counted with 3 input channels and each model's own classifier (1,000 classes: "
                                   "ImageNet) unless --in-chans / --num-classes say otherwise; a model trained on "
                                   "Fashion-MNIST (1 channel, 10 classes) has fewer, e.g. coatnet_nano 0.96M.")
    p.add_argument("--img-size", type=int, default=None,
                   help="resolution for the multiply-add count (default: 224; with --config: the model's own)")
    p.add_argument("--in-chans", type=int, default=3, help="input channels (1: grayscale)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="classifier size (default: each model's own, 1,000; 0: no classifier)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--config", metavar="NAME", default=None,
                   help="print the config of model NAME instead, one KEY=VALUE per line as `coatnet train --model-arg` "
                        "takes them (nested fields as mbconv.KEY and transformer.KEY; --json: one object) "
                        "(default: the table of all models)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..models import describe_model, get_config, list_models, model_counts

    if args.config is not None:
        config = get_config(args.config, img_size=args.img_size, in_chans=args.in_chans, num_classes=args.num_classes)
        if args.json:
            print(json.dumps(config.to_dict()))
            return 0
        for key, value in config.to_dict().items():  # KEY=VALUE as --model-arg takes them
            for name, v in (value.items() if isinstance(value, dict) else [(None, value)]):
                v = tuple(v) if isinstance(v, list) else v
                print(f"{key}{'.' + name if name else ''}={v if isinstance(v, str) else repr(v)}")
        return 0
    if args.img_size is None:
        args.img_size = 224
    overrides = dict(img_size=args.img_size, in_chans=args.in_chans, num_classes=args.num_classes)
    get_config(list_models()[0], **overrides)  # reject a bad size before printing anything
    if not args.json:
        classes = "own head" if args.num_classes is None else f"{args.num_classes} classes"
        print(f"{'model':<24} {'params (M)':>10} {f'GMACs@{args.img_size}':>10}  description "
              f"(counted with {args.in_chans} input channel{'s' if args.in_chans != 1 else ''}, {classes})")
    for name in list_models():
        config = get_config(name, **overrides)
        params, macs = model_counts(config)
        if args.json:
            print(json.dumps({"model": name, "params": params, "macs": macs, "img_size": args.img_size,
                              "in_chans": args.in_chans, "num_classes": config.num_classes}))
        else:
            print(f"{name:<24} {params / 1e6:>10.2f} {macs / 1e9:>10.3g}  {describe_model(name)}")
    return 0
