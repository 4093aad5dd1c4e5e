"""Rewrite docs/cli.md from the parser (run after changing a flag; tests/test_cli_reference.py checks it).

    PYTHONPATH=src python3 scripts/cli_reference.py
"""
from pathlib import Path

from coatnet.cli.reference import cli_reference

if __name__ == "__main__":
    path = Path(__file__).resolve().parent.parent / "docs" / "cli.md"
    path.write_text(cli_reference())
    print(f"wrote {path}")
