"""The `coatnet` command. Each command group lives in its own module with a `register(subparsers)`
function; the CLI only parses arguments and calls library functions.

stdout carries the results (JSON lines, tables, per-epoch lines); the library's notes and warnings come
through `logging` and are shown on stderr, one plain line each, as are errors."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback

from .. import __version__

# Modules under coatnet.cli that add subcommands, in the order they appear in --help.
COMMAND_MODULES = ("models", "train", "finetune", "explain", "hub", "weights", "scale", "perf", "study")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: "error: <what>; see `<prog> --help`" and exit code 2 (subcommands'
    parsers are of this class too)."""

    def error(self, message: str):
        self.exit(2, f"error: {message.strip().splitlines()[0]} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="coatnet", description="CoAtNet: train, evaluate, export.")
    parser.add_argument("--version", action="version", version=f"coatnet {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


class CliError(Exception):
    """An error to report to the user as one line, without a traceback."""


class _StderrHandler(logging.StreamHandler):
    """A handler that writes to whatever sys.stderr is when a record comes (as logging's last resort does),
    so redirections made after it was installed are followed."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def show_library_messages() -> None:
    """The library's log records of level INFO and above as plain lines on stderr (installed once)."""
    logger = logging.getLogger("coatnet")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        logger.addHandler(_StderrHandler())
    logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    show_library_messages()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a parse error (already printed as one line)
        return e.code if isinstance(e.code, int) else 2
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except (CliError, ValueError, OSError) as e:  # the user's input or the machine: the message says it
        if args.debug:
            traceback.print_exc()
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 1
    except Exception as e:  # anything else is a fault of ours: still one line, the traceback under --debug
        if args.debug:
            traceback.print_exc()
        print(f"error: {type(e).__name__}: {_one_line(e)} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    if isinstance(e, OSError) and e.strerror and e.filename is not None:  # "[Errno 2] No such ..." -> plain words
        text = f"{e.filename}: {e.strerror}"
    return text.splitlines()[0] if text else type(e).__name__
