"""`coatnet explain`: Grad-CAM, attention maps and relative-position biases as PNG files (coatnet.explain)."""
from __future__ import annotations

import argparse
import json
import sys

COMMANDS = {  # command: its line in `coatnet --help`
    "explain": "what the model looks at: Grad-CAM, attention per head, learned position bias",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("explain", help=COMMANDS["explain"],
                       description="Per image: <name>.gradcam.png (Grad-CAM of the predicted or --class label) and "
                                   "<name>.attention-S3.png, -S4.png (each head's attention of the --query position "
                                   "over the image, per Transformer stage); once: bias-S3.png, bias-S4.png (every "
                                   "head's learned relative-position bias w[dy, dx]).")
    p.add_argument("--checkpoint", required=True, help="a checkpoint-*.safetensors file, or a Hub-format folder")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files and folders")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the PNG files")
    p.add_argument("--class", dest="target", default=None, help="Grad-CAM for this class (name or index) instead "
                                                                 "of the predicted one (default: the predicted)")
    p.add_argument("--query", type=float, nargs=2, metavar=("Y", "X"), default=(0.5, 0.5),
                   help="the attention query as fractions of the image height and width (default 0.5 0.5: centre)")
    p.add_argument("--cam-stage", default=None, help="map for Grad-CAM: stem, S1..S4 (default: the deepest with at "
                                                     "least 7x7 cells)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..explain import explain

    result = explain(args.checkpoint, args.images, args.out, args.target, tuple(args.query), args.cam_stage,
                     args.device)
    for note in result["notes"]:
        print(f"note: {note}", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    else:
        for item in result["images"]:
            if "error" in item:
                continue
            print(f"{item['image']}: predicted {item['predicted']} ({item['prob']:.4f}); "
                  f"{', '.join(item['files'])}")
        for path in result["bias"]:
            print(path)
    failed = [i for i in result["images"] if "error" in i]
    for item in failed:
        print(f"warning: skipped unreadable file {item['image']}: {item['error']}", file=sys.stderr)
    if failed and len(failed) == len(result["images"]):
        from . import CliError

        raise CliError(f"cannot read image {failed[0]['image']}: {failed[0]['error']}"
                       + (f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""))
    return 0
