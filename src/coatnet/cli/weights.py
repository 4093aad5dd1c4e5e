"""`coatnet weights` (the published pretrained weights) and `coatnet download TAG`."""
from __future__ import annotations

import argparse
import json

COMMANDS = {  # command: its line in `coatnet --help`
    "weights": "list the published pretrained weights (timm's CoAtNet checkpoints)",
    "download": "fetch published weights from the Hugging Face Hub (needs coatnet[hub])",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("weights", help=COMMANDS["weights"])
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=run_weights)
    d = sub.add_parser("download", help=COMMANDS["download"])
    d.add_argument("tag", help="a tag from `coatnet weights`, e.g. coatnet_0_rw_224.sw_in1k")
    d.add_argument("--dir", default=None, help="destination folder (default: $COATNET_WEIGHTS or "
                                               "~/.cache/coatnet/weights)")
    d.set_defaults(func=run_download)


def run_weights(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from ..models.pretrained import find_weights, list_weights

    if not args.json:
        print(f"{'tag':<42} {'input':>5} {'top-1':>6} {'classes':>7}  {'license':<10} downloaded to")
    for w in list_weights():
        path = find_weights(w.tag)  # ours (`coatnet download`) or the Hugging Face cache (timm's downloads)
        have = path is not None
        if args.json:
            print(json.dumps({**asdict(w), "hub_id": w.hub_id, "downloaded": have,
                              "path": str(path) if have else None}))
        else:
            top1 = f"{w.top1:.2f}" if w.top1 is not None else "-"
            print(f"{w.tag:<42} {w.input_size:>5} {top1:>6} {w.num_classes:>7}  {w.license:<10} "
                  f"{path if have else 'no'}")
    return 0


def run_download(args: argparse.Namespace) -> int:
    from ..models.pretrained import download, sha256_of

    path = download(args.tag, args.dir)
    print(f"{path}  sha256 {sha256_of(path)}")
    return 0
