"""The command-line reference cannot drift: docs/cli.md is the parser's help, every flag's help shows its
default, the README's commands parse, and `coatnet --help` starts without loading torch."""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

import coatnet
from coatnet.cli import build_parser, main
from coatnet.cli.reference import cli_reference

ROOT = Path(__file__).resolve().parent.parent
SRC = str(Path(coatnet.__file__).resolve().parent.parent)


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_docs_cli_md_is_the_parsers_help():
    assert (ROOT / "docs" / "cli.md").read_text() == cli_reference(), (
        "docs/cli.md is out of date: run `PYTHONPATH=src python3 scripts/cli_reference.py`")


def test_every_flag_that_takes_a_value_shows_its_default():
    missing = []
    for name, command in _commands().items():
        formatter = command._get_formatter()
        for action in command._actions:
            if action.option_strings and action.nargs != 0 and not action.required:
                if "default" not in formatter._format_action(action).lower():
                    missing.append(f"coatnet {name} {action.option_strings[0]}")
    assert missing == []


def test_finetune_takes_the_data_flags_of_train():
    args = build_parser("finetune").parse_args(["finetune", "--checkpoint", "c.safetensors", "--val-fraction", "0.2",
                                                "--workers", "0", "--strict"])
    assert (args.val_fraction, args.workers, args.strict) == (0.2, 0, True)


def _readme_commands() -> list[str]:
    """The `coatnet ...` lines of the README's bash blocks, continuation lines joined, comments and [optional
    parts] removed."""
    text = (ROOT / "README.md").read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\[[^]]*\]|\s\.\.\.(?=\s|$)", "", line.split("#")[0]).strip()  # [optional], ...
            if line.startswith("coatnet "):
                lines.append(line)
    return lines


def test_the_readmes_commands_parse():
    commands = _readme_commands()
    assert len(commands) > 20
    for line in commands:
        argv = shlex.split(line)[1:]
        try:
            build_parser(argv[0]).parse_args(argv)
        except SystemExit as e:
            pytest.fail(f"README: `{line}` does not parse (exit {e.code})")


def test_help_starts_without_loading_torch():
    code = ("import sys, contextlib, io\nfrom coatnet.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()): main(['--help'])\nprint('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_every_commands_help_starts_without_loading_torch():
    # `coatnet train --help` took 2.8 s when the train flags' defaults came through coatnet.train (issue 25, 10).
    code = ("import sys, contextlib, io\nfrom coatnet.cli import command_names, main\nloaded = []\n"
            "for name in command_names():\n"
            "    with contextlib.redirect_stdout(io.StringIO()): main([name, '--help'])\n"
            "    loaded += [name] if 'torch' in sys.modules else []\nprint(loaded)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_train_help_takes_under_half_a_second():
    # 2.8-3.0 s before (issue 25, 10); `coatnet --help` alone takes about 0.3 s on a busy 2-core machine.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "coatnet", "train", "--help"], capture_output=True, check=True, env=env)
    assert time.perf_counter() - t0 < 0.5


@pytest.mark.parametrize("argv, hint", [
    (["trian"], "did you mean 'train'?"),
    (["train", "--epohcs", "3"], "did you mean '--epochs'?"),
    (["bench", "--model", "coatnet_nano", "--precision", "fp16"], "did you mean 'bf16'?"),
])
def test_a_mistyped_command_flag_or_choice_gets_a_suggestion(argv, hint, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and hint in err and len(err.strip().splitlines()) == 1
