"""`coatnet shards` (image folder -> WebDataset tar shards) and `coatnet memory` (GPU memory per process)."""
from __future__ import annotations

import argparse
import json

COMMANDS = {  # command: its line in `coatnet --help`
    "shards": "write an image folder as WebDataset tar shards for --data",
    "memory": "GPU memory per process to train a variant (computed on the meta device)",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("shards", help=COMMANDS["shards"],
                       description="Write the train and val images of an ImageFolder root as tar shards "
                                   "(train-*.tar, val-*.tar, shards.json). Train with --data OUT; under torchrun "
                                   "each process reads its own training shards, so write at least one per process.")
    p.add_argument("--from", dest="source", required=True, metavar="IMAGEFOLDER",
                   help="root with train/ and val/, or class folders (split by --val-fraction)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write the shards into")
    p.add_argument("--shard-size", type=int, default=1000, metavar="N", help="samples per shard (default 1000)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="held-out share of a folder without val/")
    p.add_argument("--seed", type=int, default=0, help="the split and the shuffle of the training samples")
    p.set_defaults(func=run_shards)

    m = sub.add_parser("memory", help=COMMANDS["memory"])
    m.add_argument("model", help="registered variant, e.g. coatnet_5")
    m.add_argument("--img-size", type=int, default=224)
    m.add_argument("--batch-per-gpu", type=int, default=32, help="images per GPU per step")
    m.add_argument("--gpus", type=int, default=8, help="processes the run is spread over")
    m.add_argument("--fsdp", action=argparse.BooleanOptionalAction, default=True,
                   help="shard weights, gradients and optimizer states (default) or replicate them (DDP)")
    m.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="recompute each block's activations in backward (default on)")
    m.add_argument("--json", action="store_true", help="print one JSON object")
    m.set_defaults(func=run_memory)


def run_shards(args: argparse.Namespace) -> int:
    from ..data.shards import write_shards

    index = write_shards(args.source, args.out, args.shard_size, args.val_fraction, args.seed)
    print(f"{args.out}: {len(index['classes'])} classes; "
          + ", ".join(f"{split} {index['counts'][split]} images in {len(files)} shard(s)"
                      for split, files in index["splits"].items())
          + (f"; skipped {len(index['skipped'])} unreadable file(s), named above" if index["skipped"] else ""))
    return 0


def run_memory(args: argparse.Namespace) -> int:
    from ..train.memory import estimate_training_memory

    e = estimate_training_memory(args.model, args.img_size, args.batch_per_gpu, args.gpus, args.fsdp,
                                 args.checkpointing)
    if args.json:
        print(json.dumps(e.to_dict()))
        return 0
    how = f"{'FSDP' if e.fsdp else 'DDP'} over {e.gpus} GPU(s), {'with' if e.checkpointing else 'no'} checkpointing"
    print(f"{e.model}: {e.params / 1e6:.0f}M parameters, {e.img_size}px, {e.batch_per_gpu} images per GPU, {how}")
    for name in ("weights", "gradients", "optimizer", "gathered_weights", "activations", "total"):
        print(f"  {name.replace('_', ' '):<17} {getattr(e, name):8.2f} GiB")
    return 0
