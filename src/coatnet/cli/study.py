"""`coatnet study layouts|attention|norms|all`: the paper's findings at Fashion-MNIST scale, run as a campaign
that survives sessions: docs/results/<study>.json (one row per finished run), .md and .png."""
from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from . import CliError

COMMANDS = {  # command: its line in `coatnet --help`
    "study": "reproduce the paper's findings at small scale (layouts, attention, norms)",
}


def register(sub: argparse._SubParsersAction) -> None:
    from ..study import STUDIES

    p = sub.add_parser("study", help=COMMANDS["study"],
                       description="Train every row of the named studies not yet recorded (resumable: rows already "
                                   "in <out>/<study>.json are skipped, so a later command continues where the last "
                                   "stopped) and write <out>/<study>.json, .md and .png. `--plan` prints the rows and "
                                   "their estimated cost on this machine and trains nothing.")
    p.add_argument("study", nargs="+", choices=[*STUDIES, "all"], help="which studies ('all': every one)")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes and budget (a minute or two; a smoke test, not results); default --out "
                        "runs/study-quick")
    p.add_argument("--out", default=None, help="results folder (default docs/results)")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="seeds to run, at every size (default: the study's)")
    p.add_argument("--sizes", type=int, nargs="+", default=None,
                   help="training-set sizes to run (default: the study's)")
    p.add_argument("--variants", nargs="+", default=None, help="variants to run (default: all of the study's)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--parallel", type=int, default=1,
                   help="rows trained at a time, each in its own process (a GPU runs many small rows side by side)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads per row (default: the CPUs divided among the parallel rows)")
    p.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="start no row that would end later; stop the running ones then (not recorded; "
                        "default: no limit)")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels, and on a GPU no TF32 (exact fp32): rows to compare across devices")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX folder (default: coatnet's default)")
    p.add_argument("--plan", action="store_true",
                   help="print every row with its estimated cost here (measured img/s x images) and the total")
    p.add_argument("--speed-only", action="store_true",
                   help="time the studies' variants side by side on --device and record it in <out>/<study>.speed.json "
                        "(the studies that compare speed: norms); trains nothing")
    p.add_argument("--report-only", action="store_true", help="rewrite the .md and .png from the JSON, train nothing")
    p.add_argument("--no-report", action="store_true", help="record rows only (no .md and .png)")
    p.set_defaults(func=run)


def _names(args: argparse.Namespace) -> list[str]:
    from ..study import STUDIES

    names = list(STUDIES) if "all" in args.study else list(dict.fromkeys(args.study))
    return names


def run(args: argparse.Namespace) -> int:
    from ..study import get_study, plan, read_rows, results_path
    from ..study.runner import RunOptions, run_studies, study_of_rows

    out = args.out or ("runs/study-quick" if args.quick else "docs/results")
    seeds, sizes = tuple(args.seeds or ()) or None, tuple(args.sizes or ()) or None
    variants = tuple(args.variants or ()) or None
    if args.parallel < 1:
        raise CliError(f"--parallel {args.parallel} must be at least 1")
    studies = [get_study(name, quick=args.quick) for name in _names(args)]
    if variants:
        known = {v for s in studies for v in s.variant_names}
        unknown = [v for v in variants if v not in known]
        if unknown:
            raise CliError(f"unknown variant(s) {', '.join(unknown)}; the studies have {', '.join(sorted(known))}")
    specs = {s.name: plan(s, seeds, sizes, tuple(v for v in variants if v in s.variant_names) if variants else None)
             for s in studies}  # the cheap mistakes first: sizes are validated
    options = RunOptions(device=args.device, threads=args.threads, data_dir=args.data_dir, parallel=args.parallel,
                         time_limit=args.time_limit, out=args.out, deterministic=args.deterministic)
    if args.plan:
        return _print_plan(studies, specs, out, options)
    if args.speed_only:
        return _time_only(studies, out, options)
    if args.report_only:  # the rows decide the recipe (full or --quick) and so the plan they report on
        for name in _names(args):
            path = results_path(out, name)
            rows = read_rows(path)
            if not rows:
                raise CliError(f"{path}: no rows to report{'' if path.is_file() else ' (no such file)'}; run "
                               f"`coatnet study {name}{' --out ' + shlex.quote(out) if args.out else ''}` first")
            study, quick = study_of_rows(name, rows)
            _report(study, rows, out, quick, args, plan(study))
        return 0
    rows = run_studies(studies, out, seeds, sizes, variants, options, log=lambda s: print(s, flush=True))
    if not args.no_report:
        for study in studies:
            _report(study, rows[study.name], out, args.quick, args, specs[study.name])
    return 0


def _report(study, rows: list[dict], out: str, quick: bool, args: argparse.Namespace, planned) -> None:
    from ..study import results_path, write_report

    command = " ".join(["coatnet", "study", study.name] + (["--quick"] if quick else [])
                       + (["--out", shlex.quote(args.out)] if args.out else []))
    reported = [r for r in rows if r.get("recipe_id") is not None]
    md = write_report(study, reported, out, command, planned)
    print(f"wrote {md} and {Path(md).with_suffix('.png')} ({len(reported)} rows of "
          f"{results_path(out, study.name)})" if reported else f"wrote {md} (no rows yet)")


def _time_only(studies, out: str, options) -> int:
    from ..study.runner import device_name, speed_path, write_speed
    from ..study.speed import time_variants

    timed = [s for s in studies if s.speed_benchmark]
    if not timed:
        raise CliError(f"no speed comparison in {', '.join(s.name for s in studies)} (norms has one)")
    for study in timed:
        print(f"timing {', '.join(study.variant_names)} side by side on {device_name(options.device)} ...", flush=True)
        speed = time_variants(study.variants, study.recipe, rounds=study.speed_rounds, device=options.device,
                              threads=options.threads)
        write_speed(out, study.name, speed, options)
        print("  " + "; ".join(f"{k}: train {v['train_img_s']:.0f} img/s, inference {v['infer_img_s']:.0f} img/s"
                               for k, v in speed.items()) + f" -> {speed_path(out, study.name)}")
    return 0


def _print_plan(studies, specs, out: str, options) -> int:
    from ..study import read_rows, results_path
    from ..study.runner import device_name, estimate_costs, row_seconds

    print(f"measuring each model's training and inference speed on {device_name(options.device)} ...", flush=True)
    per_image = estimate_costs(studies, specs, options)
    seen: dict[str, str] = {}
    total = todo_total = 0.0
    print(f"{'study':<10} {'variant':<14} {'n':>7} {'seed':>4} {'images':>9} {'est. s':>8}  status")
    for study in studies:
        recorded = {r.get("run_key") for r in read_rows(results_path(out, study.name))}
        for spec in specs[study.name]:
            seconds = row_seconds(study, spec, per_image)
            if spec.key in recorded:
                status = "recorded"
            elif spec.key in seen:
                status, seconds = f"= {seen[spec.key]}", 0.0
            else:
                status = "to run"
                todo_total += seconds
            seen.setdefault(spec.key, f"{study.name} {spec.variant.name}")
            total += seconds
            print(f"{study.name:<10} {spec.variant.name:<14} {spec.train_size:>7,} {spec.seed:>4} "
                  f"{study.recipe.images(spec.train_size):>9,} {seconds:>8.0f}  {status}")
    per = " / ".join(f"{k} {1 / v:.0f}" for k, v in per_image.items() if ":" not in k)
    side_by_side = options.rows_share_cores()
    print(f"training img/s measured here{f' (each of {options.parallel} rows timed at once)' * side_by_side}: {per}")
    if options.parallel == 1:
        print(f"total {total / 3600:.2f} h for the whole plan; {todo_total / 3600:.2f} h left to run")
    else:
        p, shared = options.parallel, "timed side by side" if side_by_side else "if they share nothing"
        print(f"total {total / 3600 / p:.2f} h for the whole plan, {todo_total / 3600 / p:.2f} h left to run, {p} rows "
              f"at a time ({shared}; one after another: {total / 3600:.2f} h and {todo_total / 3600:.2f} h)")
    return 0
