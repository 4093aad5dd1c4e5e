"""`coatnet study layouts|attention|norms`: run a small-scale reproduction of the paper and write
docs/results/<study>.json and .md."""
from __future__ import annotations

import argparse
import dataclasses
import shlex
from pathlib import Path

from . import CliError

COMMANDS = {  # command: its line in `coatnet --help`
    "study": "reproduce the paper's findings at small scale (layouts, attention, norms)",
}


def register(sub: argparse._SubParsersAction) -> None:
    from ..study import STUDIES

    p = sub.add_parser("study", help=COMMANDS["study"],
                       description="Train every row of a study (resumable: rows already in the JSON are "
                                   "skipped) and write <out>/<study>.json, .md and .png.")
    p.add_argument("study", choices=list(STUDIES), help="which study")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes and budget (a minute or two; a smoke test, not results); default --out "
                        "runs/study-quick")
    p.add_argument("--out", default=None, help="results folder (default docs/results)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds to run (default: the study's)")
    p.add_argument("--sizes", type=int, nargs="+", default=None,
                   help="training-set sizes to run (default: the study's); every seed runs at each")
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps per row instead of the study's (a different recipe: use its own --out; "
                        "default: the study's)")
    p.add_argument("--report-only", action="store_true", help="rewrite the .md and .png from the JSON, train nothing")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..study import get_study, plan, read_rows, results_path, run_study, study_of_rows, write_report

    out = args.out or ("runs/study-quick" if args.quick else "docs/results")
    quick, seeds, sizes = args.quick, tuple(args.seeds or ()) or None, tuple(args.sizes or ()) or None
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps {args.steps} must be a positive integer")
    plan(get_study(args.study, quick=quick), seeds, sizes)  # the cheap mistakes first: sizes are validated
    if args.report_only:  # the rows decide the recipe (full, --quick, --steps) and so the plan they report on
        path = results_path(out, args.study)
        rows = read_rows(path)
        if not rows:
            raise CliError(f"{path}: no rows to report{'' if path.is_file() else ' (no such file)'}; run "
                           f"`coatnet study {args.study}{' --out ' + shlex.quote(out) if args.out else ''}` first")
        study, quick = study_of_rows(args.study, rows)
        steps = study.recipe.steps if study.recipe.steps != get_study(args.study, quick).recipe.steps else None
    else:
        study = get_study(args.study, quick=quick)
        steps = args.steps
        if steps is not None:
            study = study.replace(recipe=dataclasses.replace(study.recipe, steps=steps))
    planned = plan(study, seeds, sizes)
    if not args.report_only:
        rows = run_study(study, out, seeds, sizes, log=lambda s: print(s, flush=True))
    command = " ".join(["coatnet", "study", args.study] + (["--quick"] if quick else [])
                       + (["--out", shlex.quote(args.out)] if args.out else [])
                       + (["--seeds", *map(str, seeds)] if seeds else [])
                       + (["--sizes", *map(str, sizes)] if sizes else [])
                       + (["--steps", str(steps)] if steps else []))
    reported = [r for r in rows if r.get("recipe_id") is not None]
    md = write_report(study, reported, out, command, planned)
    print(f"wrote {md} and {Path(md).with_suffix('.png')} ({len(reported)} rows of "
          f"{results_path(out, study.name)})" if reported else f"wrote {md} (no rows yet)")
    return 0
