"""docs/cli.md: the help of every command, generated from the parser (tests/test_cli_reference.py holds the
file to it; scripts/cli_reference.py rewrites it)."""
from __future__ import annotations

import argparse
import os

WIDTH = 110  # columns of the help text in the file, whatever the terminal that generates it


def cli_reference() -> str:
    """The markdown text of docs/cli.md: `coatnet --help`, then each command's --help."""
    from . import build_parser

    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(WIDTH)  # argparse wraps help text to the terminal's width
    try:
        parser = build_parser()
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parts = ["# Command-line reference", "",
                 "Generated from the parser by `scripts/cli_reference.py`; `tests/test_cli_reference.py` fails "
                 "when it differs from `coatnet COMMAND --help`. Defaults are shown as `(default: X)`.", "",
                 "```text", parser.format_help().rstrip(), "```", ""]
        for name, command in sub.choices.items():
            parts += [f"## coatnet {name}", "", "```text", command.format_help().rstrip(), "```", ""]
    finally:
        if columns is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = columns
    return "\n".join(parts)
