"""Merge the study rows a device call brought back (scripts/gpu_session.sh's $OUT/studies.json: {study: rows} for
each study the device added rows to) into the recorded files, docs/results/<study>.json:

    python3 scripts/merge_rows.py gpu_session_out/studies.json [--into docs/results]

A row already recorded (same run_key; for norms.speed, same device and time) is kept as it is; a new row is
appended; a row trained with a recipe the recorded rows do not share (another recipe_id) is refused, naming it,
and nothing is written. Each file is written atomically.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from coatnet.study.runner import read_rows, write_rows


def row_key(row: dict) -> tuple:
    if "run_key" in row:
        return ("run", row["run_key"])
    return ("speed", row.get("device_name"), row.get("measured_at"))  # norms.speed: one measurement per row


def merge(bundle: dict, into: Path) -> dict[str, tuple[int, int]]:
    """{study: (rows recorded before, rows added)}; raises ValueError (nothing written) on a foreign recipe."""
    if not isinstance(bundle, dict) or not all(isinstance(v, list) for v in bundle.values()):
        raise ValueError("expected {study name: [rows]} (scripts/gpu_session.sh's studies.json)")
    merged = {}
    for name, rows in bundle.items():
        existing = read_rows(into / f"{name}.json")
        keys = {row_key(r) for r in existing}
        new = [r for r in rows if isinstance(r, dict) and row_key(r) not in keys]
        recipes = {r["recipe_id"] for r in existing if "recipe_id" in r}
        foreign = [r for r in new if recipes and "recipe_id" in r and r["recipe_id"] not in recipes]
        if foreign:
            r = foreign[0]
            raise ValueError(f"{name}: {len(foreign)} row(s) trained with another recipe than the recorded ones "
                             f"(e.g. {r.get('variant')} n={r.get('train_size')} seed={r.get('seed')}, recipe_id "
                             f"{r['recipe_id']}); nothing merged")
        merged[name] = (existing, new)
    for name, (existing, new) in merged.items():
        if new:
            write_rows(into / f"{name}.json", existing + new)
    return {name: (len(existing), len(new)) for name, (existing, new) in merged.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--into", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "results")
    args = p.parse_args(argv)
    try:
        counts = merge(json.loads(args.bundle.read_text()), args.into)
    except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        print(f"merge_rows: {e}", file=sys.stderr)
        return 1
    for name, (before, added) in counts.items():
        print(f"{args.into / name}.json: {before} rows recorded, {added} added")
    return 0


if __name__ == "__main__":
    sys.exit(main())
