"""`coatnet save-pretrained` (a checkpoint as a Hugging Face Hub-format folder) and `coatnet push` (upload it)."""
from __future__ import annotations

import argparse

COMMANDS = {  # command: its line in `coatnet --help`
    "save-pretrained": "write a checkpoint as a Hub-format folder: config.json, model.safetensors, "
                       "README.md model card",
    "push": "upload a Hub-format folder to the Hugging Face Hub (needs coatnet[hub])",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("save-pretrained", help=COMMANDS["save-pretrained"])
    p.add_argument("--checkpoint", required=True, help="a checkpoint-*.safetensors file of a training run")
    p.add_argument("folder", metavar="DIR", help="the folder to write (new, empty, or an earlier one of ours)")
    p.add_argument("--license", default="apache-2.0", help="licence of the weights for the model card "
                                                           "(default apache-2.0)")
    p.add_argument("--repo", default=None, metavar="USER/NAME", help="the Hub repo it is meant for (usage lines "
                                                                      "of the model card; default: none)")
    p.set_defaults(func=run_save)
    q = sub.add_parser("push", help=COMMANDS["push"])
    q.add_argument("folder", metavar="DIR", help="a folder written by `coatnet save-pretrained`")
    q.add_argument("--repo", required=True, metavar="USER/NAME", help="the Hub model repo (created if missing)")
    q.add_argument("--private", action="store_true", help="create the repo as private")
    q.add_argument("--token", default=None, help="Hugging Face token (default: huggingface_hub's login or $HF_TOKEN)")
    q.set_defaults(func=run_push)


def run_save(args: argparse.Namespace) -> int:
    from ..publish import save_pretrained

    folder = save_pretrained(args.checkpoint, args.folder, license=args.license, repo_id=args.repo)
    print(f"{folder}: " + ", ".join(sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))))
    return 0


def run_push(args: argparse.Namespace) -> int:
    from ..publish import push_to_hub

    print(push_to_hub(args.folder, args.repo, token=args.token, private=args.private))
    return 0
