"""The `coatnet` command. Each command group lives in its own module with a `register(subparsers)`
function; the CLI only parses arguments and calls library functions.

stdout carries the results (JSON lines, tables, per-epoch lines); the library's notes and warnings come
through `logging` and are shown on stderr, one plain line each, as are errors."""
from __future__ import annotations

import argparse
import copy
import importlib
import logging
import os
import re
import sys
import traceback

from ..utils import did_you_mean
from ..version import __version__

# Modules under coatnet.cli that add subcommands, in the order they appear in --help. Each has COMMANDS
# ({name: one-line help}) and register(subparsers), which adds those commands with all their flags.
COMMAND_MODULES = ("models", "train", "finetune", "explain", "hub", "weights", "scale", "perf", "study")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's help ends with its default, "(default: X)", unless the text already states it or there is
    none to state (a required flag, a switch, a setting left to the library: default None)."""

    @staticmethod
    def _states_no_default(action: argparse.Action) -> bool:
        return ("default" in (action.help or "").lower() or action.required or not action.option_strings
                or any(action.default is v for v in (None, False, True, argparse.SUPPRESS)))

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        return text if self._states_no_default(action) else super()._get_help_string(action)

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and not self._states_no_default(action):  # a flag without help text still
            action = copy.copy(action)                                      # shows its default
            action.help = "(default: %(default)s)"
        return super()._format_action(action)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: "error: <what>; see `<prog> --help`" and exit code 2, a "did you mean"
    for a mistyped choice or flag, no abbreviated flags, and help that shows every default (subcommands' parsers
    are of this class too)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)  # `--epoch 1` is an error, not silently --epochs 1
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        message = message.strip().splitlines()[0]
        self.exit(2, f"error: {message}{_did_you_mean(message, self)} (see `{self.prog} --help`)\n")


def _did_you_mean(message: str, parser: argparse.ArgumentParser) -> str:
    """"; did you mean 'x'?" for argparse's "invalid choice: 'y' (choose from ...)" and "unrecognized
    arguments: --y" messages, when a close match exists."""
    choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
    if choice:
        word, options = choice.group(1), re.findall(r"'([^']*)'", choice.group(2)) or choice.group(2).split(", ")
    else:
        flag = re.search(r"unrecognized arguments: (--[\w-]+)", message)
        if not flag:
            return ""
        parsers = [parser] + [p for a in parser._actions if isinstance(a, argparse._SubParsersAction)
                              for p in a.choices.values()]  # the top parser reports its command's leftovers
        word, options = flag.group(1), [o for p in parsers for a in p._actions for o in a.option_strings]
    return did_you_mean(word, options)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `coatnet` parser. With `command`, only that command's flags are built (the others are listed with
    their one-line help: `coatnet --help` and a command's start-up import nothing else); None: all of them."""
    parser = _Parser(prog="coatnet", description="CoAtNet: train, evaluate, export.")
    parser.add_argument("--version", action="version", version=f"coatnet {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        if command is None or command in module.COMMANDS:
            module.register(sub)
        else:
            for cmd, text in module.COMMANDS.items():
                sub.add_parser(cmd, help=text)
    return parser


def command_names() -> list[str]:
    return [cmd for name in COMMAND_MODULES for cmd in importlib.import_module(f"{__name__}.{name}").COMMANDS]


class CliError(Exception):
    """An error to report to the user as one line, without a traceback."""


class _StreamHandler(logging.StreamHandler):
    """A handler that writes to whatever sys.stderr (or sys.stdout) is when a record comes (as logging's last
    resort does), so redirections made after it was installed are followed."""

    def __init__(self, stream_name: str = "stderr") -> None:
        super().__init__()
        self.stream_name = stream_name
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self):
        return getattr(sys, self.stream_name)

    @stream.setter
    def stream(self, _value) -> None:
        pass


def show_library_messages() -> None:
    """The library's log records of level INFO and above as plain lines: a training run's report
    ("coatnet.train.report": the per-epoch lines) on stdout, everything else on stderr (installed once)."""
    logger, report = logging.getLogger("coatnet"), logging.getLogger(_REPORT)
    if not any(isinstance(h, _StreamHandler) for h in logger.handlers):
        stderr = _StreamHandler("stderr")
        stderr.addFilter(lambda record: record.name != _REPORT)  # the report's handler is its own logger's
        logger.addHandler(stderr)
        report.addHandler(_StreamHandler("stdout"))
    logger.setLevel(logging.INFO)


_REPORT = "coatnet.train.report"  # train/messages.py


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return _main(argv)
    except BrokenPipeError:  # `coatnet weights | head -2`: the reader has gone; stop quietly, as cat(1) does
        _quiet_stdout()
        return 141  # 128 + SIGPIPE, what a shell reports for a command stopped by a closed pipe


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so that Python's final flush does not report the broken pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _main(argv: list[str]) -> int:
    show_library_messages()
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in command_names() else "")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a parse error (already printed as one line)
        return e.code if isinstance(e.code, int) else 2
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as e:  # a command may say what was kept and how to continue
        print(f"error: interrupted{f'; {e}' if str(e) else ''}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        raise
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
