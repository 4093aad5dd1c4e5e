"""Running studies: one training run per row through `coatnet.train.train`, each finished row appended to
<out>/<study>.json at once (atomically), so a killed campaign resumes where it stopped, in this session or
a later one.

A row is measured after training, from the run's last checkpoint, in eval mode and without augmentation:
- test_*: the 10,000 Fashion-MNIST test images (the recipe may name a subset), scored as the main job scores
  them (each image averaged with its mirror image);
- train_*: a seeded sample of at most `recipe.train_eval_images` of the row's own training images, so
  train_top1 - test_top1 is the generalization gap at any training-set size, and train_loss the final
  training loss of the paper's Fig. 2 (the fit, without augmentation or label smoothing);
- convergence: the engine's per-epoch training loss; every epoch has the same number of steps, so the change
  between the mean loss of the last tenth of the steps and the tenth before it measures how much the loss
  still moved over the last 20% of the steps (`loss_change_last20`, relative).

Rows run one after another in this process, or `parallel` at a time in their own processes (a GPU runs many
of these small models side by side); `time_limit` starts no row that would not finish in time and stops the
ones still running when it is reached (they are not recorded: a later call runs them).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import multiprocessing
import os
import platform
import queue
import shlex
import statistics
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

import torch

from ..data import build_data
from ..layers.bf16_cpu import cpu_features
from ..models import build_on_meta, count_params, get_config
from ..models import variants as registry
from ..train import TrainConfig, train
from ..train.checkpoint import load_model, weights_path
from ..train.evaluate import evaluate, subset_indices
from ..train.runtime import setup_runtime
from ..utils import atomic_write
from .definitions import BASE_MODEL, Recipe, Study, Variant, get_study, recipe_id, run_key
from .speed import time_variants

ROW_FIELDS = ("study", "variant", "layout", "train_size", "seed", "params", "train_loss", "train_top1", "test_loss",
              "test_top1", "test_top5", "gap_top1", "loss_change_last20", "train_loss_epochs", "seconds", "epochs",
              "steps", "images_seen", "model", "recipe", "recipe_id", "run_key", "device", "device_name",
              "precision", "parallel", "machine", "command", "finished_at")


@dataclasses.dataclass(frozen=True)
class RowSpec:
    """One planned training run of a study."""

    variant: Variant
    train_size: int
    seed: int
    key: str  # run_key(model config, recipe, size, seed)


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """Where and how rows run (not part of a row's identity: a row is the same experiment on any machine)."""

    device: str = "cpu"  # "cpu" or "cuda"
    threads: Optional[int] = None  # torch CPU threads per row (None: all CPUs, divided among parallel rows)
    data_dir: Optional[str] = None  # Fashion-MNIST IDX folder (None: the default)
    parallel: int = 1  # rows at a time, each in its own process (1: in this process)
    time_limit: Optional[float] = None  # seconds from the start: no row starts that would end later
    out: Optional[str] = None  # the --out the rows' commands name (None: docs/results, left out)
    deterministic: bool = False  # deterministic kernels, and on a GPU no TF32: exact fp32 (device checks)

    def row_threads(self) -> int:
        return self.threads or max(1, (os.cpu_count() or 1) // max(1, self.parallel))

    def rows_share_cores(self) -> bool:
        """Several rows at a time on the CPU: they divide its cores, so their speed is timed side by side."""
        return self.parallel > 1 and self.device == "cpu"


def model_config_dict(overrides: dict, recipe: Recipe) -> dict:
    """The resolved model config of a study model (as the engine builds it for Fashion-MNIST)."""
    return get_config(BASE_MODEL, **overrides, img_size=recipe.img_size, in_chans=1, num_classes=10).to_dict()


def study_params(variant: Variant, recipe: Recipe) -> int:
    """Parameters of a study model as trained (1 input channel, 10 classes)."""
    cfg = get_config(BASE_MODEL, **variant.overrides, img_size=recipe.img_size, in_chans=1, num_classes=10)
    return count_params(build_on_meta(cfg))


def plan(study: Study, seeds: Optional[tuple[int, ...]] = None, sizes: Optional[tuple[int, ...]] = None,
         variants: Optional[tuple[str, ...]] = None) -> list[RowSpec]:
    """The rows of `study`, seed by seed (so an interrupted campaign has whole grids of the first seeds).
    `seeds` / `sizes` / `variants` restrict or replace the study's; named seeds run at every size."""
    for s in sizes or ():
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise ValueError(f"train size {s!r} must be a positive integer")
    chosen = [study.variant(name) for name in variants] if variants else list(study.variants)
    sizes = tuple(sizes) if sizes else study.train_sizes
    rows = []
    for i, seed in enumerate(tuple(seeds) if seeds else study.seeds):
        for size in sizes:
            if not seeds and seed not in study.seeds_for(size):
                continue
            for v in chosen:
                key = run_key(model_config_dict(v.overrides, study.recipe), study.recipe, size, seed)
                rows.append(RowSpec(v, size, seed, key))
    return rows


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    """The GPU's name, or the CPU's model, count and vector instructions."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return f"{cpu_name()} ({os.cpu_count()} CPUs; {cpu_features()})"


def machine_description(device: str = "cpu") -> str:
    return (f"{platform.system()} {platform.machine()}, {device_name(device)}, torch {torch.__version__}, "
            f"python {platform.python_version()}")


def machine_load() -> dict:
    """How shared the machine was when a row ran: the process's niceness, the 1-minute load average and the CPU
    count (the report says "shared" only when these say so)."""
    return {"nice": os.nice(0), "load_avg": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()}


def row_command(study: str, spec: RowSpec, options: RunOptions) -> str:
    """The command that trains this row again (into another folder, so that it is not skipped as recorded)."""
    recorded_here = options.out is None or Path(options.out).as_posix().split("/")[:2] == ["docs", "results"]
    out = "runs/study-rerun" if recorded_here else options.out
    return " ".join(["coatnet", "study", study, "--variants", shlex.quote(spec.variant.name), "--sizes",
                     str(spec.train_size), "--seeds", str(spec.seed), "--device", torch.device(options.device).type,
                     *(["--deterministic"] if options.deterministic else []), "--out", shlex.quote(out)])


def study_of_rows(name: str, rows: list[dict]) -> tuple[Study, bool]:
    """(study, quick): the definition of study `name` (full or --quick) whose recipe produced `rows`."""
    ids = {r.get("recipe_id") for r in rows}
    for quick in (False, True):
        study = get_study(name, quick=quick)
        if recipe_id(study.recipe) in ids:
            return study, quick
    raise ValueError(f"the {name} rows were trained with a recipe this version does not define "
                     f"(recipe_id {', '.join(map(str, ids))}); rerun the study")


# -- the results file ----------------------------------------------------------------------------------
def results_path(out_dir: str | os.PathLike, study_name: str) -> Path:
    return Path(out_dir) / f"{study_name}.json"


def read_rows(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    try:
        rows = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); move it away to start the study afresh") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path} is not a list of result rows")
    return rows


def write_rows(path: str | os.PathLike, rows: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(rows, indent=1) + "\n")


# -- one row -------------------------------------------------------------------------------------------
TrainFn = Callable[..., dict]


def _engine_model(variant: Variant) -> dict:
    """TrainConfig fields selecting the study model: coatnet_micro itself, or a name registered (once per
    process) for its overrides."""
    if get_config(BASE_MODEL, **variant.overrides) == get_config(BASE_MODEL):
        return {"model": BASE_MODEL}
    name = "study-" + run_key(variant.overrides, Recipe(), 0, 0)
    if name not in registry.list_models():
        overrides = dict(variant.overrides)
        registry.register(name, f"study model {variant.name}")(lambda: get_config(BASE_MODEL, **overrides))
    return {"model": name}


def train_config(spec: RowSpec, recipe: Recipe, run_dir: str | os.PathLike, options: RunOptions = RunOptions()):
    """The coatnet.train.TrainConfig of one row."""
    size = spec.train_size
    engine_val = recipe.engine_val_images if recipe.val_subset is None else min(recipe.engine_val_images,
                                                                                  recipe.val_subset)
    return TrainConfig(
        data=recipe.data, data_dir=options.data_dir, img_size=recipe.img_size, train_subset=size,
        val_subset=engine_val, epochs=recipe.epochs, min_epoch_images=recipe.min_epoch_images,
        batch_size=recipe.batch_size, lr=recipe.lr, min_lr=recipe.min_lr, warmup_epochs=recipe.warmup_epochs,
        weight_decay=recipe.weight_decay, clip_grad=recipe.clip_grad, label_smoothing=recipe.label_smoothing,
        hflip=recipe.hflip, drop_path=0.0, precision=recipe.precision, device=options.device,
        threads=options.row_threads(), seed=spec.seed, deterministic=options.deterministic, out=str(run_dir),
        progress=False, quiet=True,
        **_engine_model(spec.variant))


def evaluate_run(run_dir: str | os.PathLike, recipe: Recipe, train_size: int, seed: int,
                 options: RunOptions = RunOptions()) -> dict:
    """Eval-mode loss / top-1 / top-5 of the run's last checkpoint on a sample of its own training images
    (prefix train_, one view) and on the test images (prefix test_, averaged with the mirror image as the
    main job scores)."""
    runtime = setup_runtime(options.device, recipe.precision, threads=options.row_threads(),
                            deterministic=options.deterministic)
    model, spec, _ = load_model(weights_path(run_dir, "last"), runtime.device)
    runtime.prepare(model)
    train_src, test_src, _ = build_data(recipe.data, options.data_dir, 0.1, spec.img_size, spec.crop_fraction, seed)
    # The engine trains on subset_indices(len, train_subset, seed, stream=1); sample from exactly those.
    train_idx = subset_indices(len(train_src), train_size, seed, stream=1)
    sample = train_idx[subset_indices(len(train_idx), recipe.train_eval_images, seed, stream=11)]
    test_idx = subset_indices(len(test_src), recipe.val_subset, seed, stream=2)
    out = {}
    for prefix, src, idx, tta_flip in (("train", train_src, sample, False),
                                       ("test", test_src, test_idx, recipe.hflip > 0)):
        r = evaluate(model, src, idx, spec, runtime, 500, 0, tta_flip=tta_flip)
        out.update({f"{prefix}_loss": r["loss"], f"{prefix}_top1": r["top1"], f"{prefix}_top5": r["top5"],
                    f"{prefix}_images": r["n"]})
    return out


def loss_change_last20(losses: list[float]) -> Optional[float]:
    """Relative change of the training loss over the last 20% of the steps: (mean of the last tenth of the
    epochs - mean of the tenth before) / the latter; epochs have equal steps. None under 2 epochs."""
    k = max(1, round(len(losses) / 10))
    if len(losses) < 2 * k or len(losses) < 2:
        return None
    last, before = statistics.fmean(losses[-k:]), statistics.fmean(losses[-2 * k:-k])
    return (last - before) / before if before else None


def run_row(study: Study, spec: RowSpec, options: RunOptions = RunOptions(), train_fn: Optional[TrainFn] = None
            ) -> dict:
    """Train and measure one row; returns the result row (ROW_FIELDS and a few more)."""
    train_fn = train if train_fn is None else train_fn
    recipe = study.recipe
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix=f"coatnet-study-{study.name}-") as run_dir:
        res = train_fn(train_config(spec, recipe, run_dir, options))
        seconds_train = time.time() - t0
        ev = evaluate_run(run_dir, recipe, spec.train_size, spec.seed, options)
        metrics = Path(run_dir) / "metrics.jsonl"
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] \
            if metrics.is_file() else []
    losses = [r["train_loss"] for r in records]
    steps = int(res.get("steps") or 0)
    row = {
        "study": study.name, "variant": spec.variant.name, "layout": spec.variant.layout,
        "train_size": spec.train_size, "seed": spec.seed, "params": int(res["params"]),
        "train_loss": ev["train_loss"], "train_top1": ev["train_top1"],
        "test_loss": ev["test_loss"], "test_top1": ev["test_top1"], "test_top5": ev["test_top5"],
        "gap_top1": ev["train_top1"] - ev["test_top1"],
        "loss_change_last20": loss_change_last20(losses), "train_loss_epochs": losses,
        "val_top1_epochs": [r.get("val_top1") for r in records],
        "train_eval_images": ev["train_images"], "test_images": ev["test_images"],
        "seconds": seconds_train, "seconds_total": time.time() - t0,
        "img_per_s": statistics.fmean(r["img_per_s"] for r in records) if records else None,
        "epochs": res.get("epochs"), "steps": steps, "images_seen": steps * recipe.batch_size,
        "epochs_seen": steps * recipe.batch_size / spec.train_size,
        "model": {k: list(v) if isinstance(v, tuple) else v for k, v in spec.variant.overrides.items()},
        "base_model": BASE_MODEL, "recipe": dataclasses.asdict(recipe), "recipe_id": recipe_id(recipe),
        "run_key": spec.key, "device": torch.device(options.device).type, "device_name": device_name(options.device),
        "precision": res.get("precision", recipe.precision), "parallel": options.parallel,
        "deterministic": options.deterministic,
        "threads": options.row_threads(), "machine": machine_description(options.device), **machine_load(),
        "command": row_command(study.name, spec, options),
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return row


# -- many rows -----------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Job:
    """One training run and the studies (with their variant names) that record it."""

    study: Study  # the first study that planned it: its recipe and name train it
    spec: RowSpec
    wanted_by: list[tuple[str, str]]  # (study name, variant name)


def _reusable_rows(out_dir: Path, names: set[str]) -> dict[str, dict]:
    """Rows of the studies in out_dir not being run now, by run_key: an identical run need not be trained
    twice."""
    found = {}
    for path in sorted(out_dir.glob("*.json")):
        if path.stem in names:
            continue
        try:
            rows = read_rows(path)
        except ValueError:
            continue
        for r in rows:
            if "run_key" in r and r.get("reused_from") is None:
                found.setdefault(r["run_key"], r)
    return found


def _row_process(study: Study, spec: RowSpec, options: RunOptions, results) -> None:
    """A worker process: one row, its result (or the error) put on `results`."""
    try:
        results.put((spec.key, run_row(study, spec, options), None))
    except BaseException as e:  # noqa: BLE001 - reported by the parent, which carries on
        results.put((spec.key, None, f"{type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}"))


def _run_parallel(jobs: list[_Job], options: RunOptions, record: Callable[[_Job, dict], None],
                  log: Callable[[str], None], t_start: float) -> list[_Job]:
    """Run `jobs` `options.parallel` at a time, each in its own (spawned) process; returns the jobs not run."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    pending, running, left = list(jobs), {}, []
    seconds_per_image: list[float] = []  # of finished rows: the estimate of the next ones

    def estimate(job: _Job) -> Optional[float]:
        if not seconds_per_image:
            return None
        return statistics.median(seconds_per_image) * job.study.recipe.images(job.spec.train_size)

    def time_left() -> float:
        return float("inf") if options.time_limit is None else options.time_limit - (time.time() - t_start)

    while pending or running:
        while pending and len(running) < options.parallel:
            job = pending.pop(0)
            est = estimate(job)
            if est is not None and est > time_left():
                left.append(job)
                continue
            proc = ctx.Process(target=_row_process, args=(job.study, job.spec, options, results), daemon=True)
            proc.start()
            running[job.spec.key] = (proc, job, time.time())
            log(f"{_tag(job)}: started ({len(running)} running)")
        try:
            key, row, error = results.get(timeout=1.0)
        except queue.Empty:
            key = None
        if key is not None:
            proc, job, started = running.pop(key)
            proc.join(timeout=30)
            if error:
                log(f"{_tag(job)}: FAILED: {error}")
            else:
                seconds_per_image.append((time.time() - started) / job.study.recipe.images(job.spec.train_size))
                record(job, row)
        for k, (proc, job, _) in list(running.items()):  # died without a word (killed, out of memory)
            if not proc.is_alive() and proc.exitcode not in (0, None):
                running.pop(k)
                log(f"{_tag(job)}: FAILED: the process ended with exit code {proc.exitcode}")
        if time_left() <= 0:
            for proc, job, _ in running.values():
                proc.terminate()
                left.append(job)
                log(f"{_tag(job)}: stopped at the time limit (not recorded)")
            for proc, _, _ in running.values():
                proc.join(timeout=10)
            running.clear()
            left.extend(pending)
            pending.clear()
    return left


def _tag(job: _Job) -> str:
    return (f"{'/'.join(s for s, _ in job.wanted_by)} {job.spec.variant.name} n={job.spec.train_size} "
            f"seed={job.spec.seed}")


def run_studies(studies: list[Study], out_dir: str | os.PathLike, seeds: Optional[tuple[int, ...]] = None,
                sizes: Optional[tuple[int, ...]] = None, variants: Optional[tuple[str, ...]] = None,
                options: RunOptions = RunOptions(), train_fn: Optional[TrainFn] = None,
                log: Callable[[str], None] = print) -> dict[str, list[dict]]:
    """Run every planned row of `studies` not yet in out_dir/<study>.json, appending each (to every study
    that planned it) as it finishes; returns {study name: all rows of its file}. A run that two studies plan
    (C-C-T-T is the attention study's "relative" and the norms study's "batchnorm") is trained once. Rows of
    another recipe are dropped (a file describes one experiment); rows outside the plan are kept."""
    t_start = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = {s.name for s in studies}
    rows: dict[str, list[dict]] = {}
    for study in studies:
        path, rid = results_path(out_dir, study.name), recipe_id(study.recipe)
        existing = read_rows(path)
        rows[study.name] = [r for r in existing if r.get("recipe_id") == rid]
        if len(rows[study.name]) < len(existing):
            log(f"{path}: dropping {len(existing) - len(rows[study.name])} row(s) of another recipe")
            write_rows(path, rows[study.name])
    recorded = {r["run_key"]: r for rs in rows.values() for r in rs if "run_key" in r}
    reusable = {**_reusable_rows(out_dir, names), **recorded}
    jobs: dict[str, _Job] = {}
    for study in studies:
        done = {r.get("run_key") for r in rows[study.name]}
        for spec in plan(study, seeds, sizes, variants if variants and len(studies) == 1 else
                         tuple(v for v in variants or () if v in study.variant_names) or None):
            if spec.key in done:
                continue
            if spec.key in reusable:  # an identical run recorded by another study
                row = {**reusable[spec.key], "study": study.name, "variant": spec.variant.name,
                       "reused_from": reusable[spec.key]["study"]}
                rows[study.name].append(row)
                write_rows(results_path(out_dir, study.name), rows[study.name])
                log(f"{study.name} {spec.variant.name} n={spec.train_size} seed={spec.seed}: identical run found in "
                    f"{row['reused_from']}.json, reused")
                continue
            job = jobs.setdefault(spec.key, _Job(study, spec, []))
            job.wanted_by.append((study.name, spec.variant.name))
    # Seed by seed (whole grids of the first seeds first), the longest rows of a seed first: with a time limit
    # and rows in parallel, the long ones do not start last and leave the device idle at the end.
    todo = sorted(jobs.values(), key=lambda j: (j.spec.seed, -j.study.recipe.images(j.spec.train_size)))
    log(f"{len(todo)} row(s) to train ({', '.join(f'{n}: {len(r)} recorded' for n, r in rows.items())}) on "
        f"{device_name(options.device)}, {options.parallel} at a time")

    def record(job: _Job, row: dict) -> None:
        for name, variant in job.wanted_by:
            first = name == job.study.name
            entry = {**row, "study": name, "variant": variant, **({} if first else {"reused_from": job.study.name})}
            rows[name].append(entry)
            write_rows(results_path(out_dir, name), rows[name])
        log(f"{_tag(job)}: train_loss {row['train_loss']:.4f} train_top1 {row['train_top1']:.2f} test_top1 "
            f"{row['test_top1']:.2f} gap {row['gap_top1']:.2f} loss change (last 20%) "
            f"{_percent(row['loss_change_last20'])} ({row['seconds_total']:.0f}s)")

    for study in studies:  # the norms study's speed comparison, once, before its rows share the machine
        if study.speed_benchmark and any(j.study.name == study.name or (study.name, v) in j.wanted_by
                                         for j in todo for v in study.variant_names):
            log(f"study {study.name}: timing the variants side by side ...")
            speed = time_variants(study.variants, study.recipe, rounds=study.speed_rounds, device=options.device,
                                  threads=options.threads)
            log("  " + "; ".join(f"{k}: train {v['train_img_s']:.0f} img/s, inference {v['infer_img_s']:.0f} "
                                 f"img/s" for k, v in speed.items()))
            write_speed(out_dir, study.name, speed, options)

    if options.parallel > 1 and todo:
        left = _run_parallel(todo, options, record, log, t_start)
    else:
        left = []
        for i, job in enumerate(todo, 1):
            if options.time_limit is not None and time.time() - t_start > options.time_limit:
                left = todo[i - 1:]
                break
            log(f"[{i}/{len(todo)}] {_tag(job)}: training ...")
            record(job, run_row(job.study, job.spec, options, train_fn))
    if left:
        log(f"{len(left)} row(s) not run (time limit): run the same command again to continue")
    return rows


def _percent(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:+.1f}%"


def speed_path(out_dir: str | os.PathLike, study_name: str) -> Path:
    return Path(out_dir) / f"{study_name}.speed.json"


def write_speed(out_dir: str | os.PathLike, study_name: str, speed: dict, options: RunOptions) -> None:
    """The side-by-side timing of a study's variants, kept per device (a later timing on the same device
    replaces the earlier one)."""
    path = speed_path(out_dir, study_name)
    try:
        known = json.loads(path.read_text()) if path.is_file() else []
    except json.JSONDecodeError:
        known = []
    name = device_name(options.device)
    entry = {"device": torch.device(options.device).type, "device_name": name, "machine": machine_description(
        options.device), "threads": options.threads, **machine_load(), "variants": speed,
        "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    known = [k for k in known if isinstance(k, dict) and k.get("device_name") != name] + [entry]
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(known, indent=1) + "\n")


# -- the plan's cost -------------------------------------------------------------------------------------
def _time_recipe(variants: tuple[Variant, ...], recipe: Recipe, rounds: int, device: str,
                 threads: Optional[int]) -> dict[str, dict]:
    return time_variants(variants, recipe, rounds=rounds, steps=2, batch_size=recipe.batch_size, device=device,
                         threads=threads)


def _timed_in_process(variants: tuple[Variant, ...], recipe: Recipe, rounds: int, device: str, threads: int,
                      results: "multiprocessing.Queue") -> None:
    results.put(_time_recipe(variants, recipe, rounds, device, threads))


def _time_side_by_side(variants: tuple[Variant, ...], recipe: Recipe, options: RunOptions,
                       rounds: int) -> dict[str, dict]:
    """time_variants as `options.parallel` rows run: that many spawned processes timing at once, each with
    the row's threads; the mean of their rates (each row runs at one process's rate while the others run)."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_timed_in_process, daemon=True,
                         args=(variants, recipe, rounds, options.device, options.row_threads(), results))
             for _ in range(options.parallel)]
    for p in procs:
        p.start()
    try:
        speeds = [results.get(timeout=1800) for _ in procs]
    except queue.Empty:
        raise RuntimeError("timing the variants side by side did not finish in 30 minutes") from None
    finally:
        for p in procs:
            p.join(timeout=60)
    return {name: {key: statistics.fmean(s[name][key] for s in speeds) for key in ("train_img_s", "infer_img_s")}
            for name in speeds[0]}


def estimate_costs(studies: list[Study], specs: dict[str, list[RowSpec]], options: RunOptions,
                   rounds: int = 3) -> dict[str, float]:
    """{variant name: seconds per training image} of every variant in `specs`, measured here: training steps
    of the recipe's batch (time_variants), plus the per-epoch precise BatchNorm pass and test scoring and
    the final scoring, spread over the images of a row. With `options.parallel` > 1 on the CPU the rows share
    the cores, so the speed is measured that way: that many processes timing at once."""
    per_image: dict[str, float] = {}
    for study in studies:
        names = {s.variant.name for s in specs.get(study.name, [])}
        variants = tuple(v for v in study.variants if v.name in names and v.name not in per_image)
        if not variants:
            continue
        if options.rows_share_cores():
            speed = _time_side_by_side(variants, study.recipe, options, rounds)
        else:
            speed = _time_recipe(variants, study.recipe, rounds, options.device, options.threads)
        for name, v in speed.items():
            per_image[name] = 1.0 / v["train_img_s"]
            per_image[name + ":infer"] = 1.0 / v["infer_img_s"]
    return per_image


def row_seconds(study: Study, spec: RowSpec, per_image: dict[str, float]) -> float:
    """Estimated seconds of one row: its training images at the measured rate, plus each epoch's precise
    BatchNorm (2,048 images) and scoring of engine_val_images (x2: mirror), plus the final scoring."""
    r = study.recipe
    train = r.images(spec.train_size) * per_image[spec.variant.name]
    infer = per_image[spec.variant.name + ":infer"]
    evals = r.epochs * (2048 + 2 * r.engine_val_images) + 2 * (r.val_subset or 10_000) + r.train_eval_images
    # x1.15: the data pipeline, optimizer and checkpoints beside the timed steps (calibrated against three CPU
    # rows of C-C-T-T at n=1,000 on 2026-12-04: 88-106 s measured, 87 s estimated without it)
    return 1.15 * (train + evals * infer) + 5.0  # 5 s: start-up, data loading
