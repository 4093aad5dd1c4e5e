"""`coatnet study layouts|attention|norms`: run a small-scale reproduction of the paper and write
docs/results/<study>.json and .md."""
from __future__ import annotations

import argparse
import dataclasses
import shlex


def register(sub: argparse._SubParsersAction) -> None:
    from ..study import STUDIES

    p = sub.add_parser("study", help="reproduce the paper's findings at small scale (layouts, attention, norms)",
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
                   help="optimizer steps per row instead of the study's (a different recipe: use its own --out)")
    p.add_argument("--report-only", action="store_true", help="rewrite the .md and .png from the JSON, train nothing")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..study import get_study, plan, read_rows, results_path, run_study, write_report

    study = get_study(args.study, quick=args.quick)
    if args.steps is not None:
        if args.steps < 1:
            raise ValueError(f"--steps {args.steps} must be a positive integer")
        study = study.replace(recipe=dataclasses.replace(study.recipe, steps=args.steps))
    out = args.out or ("runs/study-quick" if args.quick else "docs/results")
    seeds = tuple(args.seeds) if args.seeds else None
    sizes = tuple(args.sizes) if args.sizes else None
    planned = plan(study, seeds, sizes)  # validates sizes before any training
    if args.report_only:
        rows = read_rows(results_path(out, study.name))
    else:
        rows = run_study(study, out, seeds, sizes, log=lambda s: print(s, flush=True))
    command = " ".join(["coatnet", "study", args.study] + (["--quick"] if args.quick else [])
                       + (["--out", shlex.quote(args.out)] if args.out else [])
                       + (["--seeds", *map(str, seeds)] if seeds else [])
                       + (["--sizes", *map(str, sizes)] if sizes else [])
                       + (["--steps", str(args.steps)] if args.steps else []))
    md = write_report(study, [r for r in rows if r.get("recipe_id") is not None], out, command, planned)
    print(f"wrote {results_path(out, study.name)} ({len(rows)} rows) and {md}")
    return 0
