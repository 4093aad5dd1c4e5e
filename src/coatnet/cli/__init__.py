"""The `coatnet` command. Each command group lives in its own module with a `register(subparsers)`
function; the CLI only parses arguments and calls library functions."""
from __future__ import annotations

import argparse
import importlib
import sys
import traceback

# Modules under coatnet.cli that add subcommands, in the order they appear in --help.
COMMAND_MODULES = ("models", "train", "finetune", "weights", "scale", "perf", "study")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="coatnet", description="CoAtNet: train, evaluate, export.")
    parser.add_argument("--version", action="version", version=f"coatnet {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


class CliError(Exception):
    """An error to report to the user as one line, without a traceback."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except (CliError, ValueError, FileNotFoundError, IsADirectoryError, PermissionError, OSError) as e:
        if args.debug:
            traceback.print_exc()
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 1
