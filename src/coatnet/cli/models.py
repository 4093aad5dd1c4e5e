"""`coatnet models`: the registered variants with their parameters and multiply-adds."""
from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the model variants with parameters and multiply-adds")
    p.add_argument("--img-size", type=int, default=224, help="resolution for the multiply-add count")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..models import build_on_meta, count_macs, count_params, describe_model, get_config, list_models

    get_config(list_models()[0], img_size=args.img_size)  # reject a bad size before printing anything
    if not args.json:
        print(f"{'model':<24} {'params (M)':>11} {f'GMACs@{args.img_size}':>11}  description")
    for name in list_models():
        model = build_on_meta(get_config(name, img_size=args.img_size))
        params, macs = count_params(model), count_macs(model)
        if args.json:
            print(json.dumps({"model": name, "params": params, "macs": macs, "img_size": args.img_size}))
        else:
            print(f"{name:<24} {params / 1e6:>11.2f} {macs / 1e9:>11.2f}  {describe_model(name)}")
    return 0
