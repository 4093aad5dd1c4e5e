"""Running a study: one training run per row through `coatnet.train.train`, each finished row appended to
docs/results/<study>.json at once (atomically), so a killed run resumes where it stopped.

A row is measured after training, from the run's last checkpoint, in eval mode and without augmentation:
- val_*: the Fashion-MNIST test images (all 10,000 unless the recipe names a subset);
- train_*: a seeded sample of at most `recipe.train_eval_images` of the row's own training images, so train_top1 -
  val_top1 is the generalization gap whatever the training-set size (the engine's own per-epoch
  evaluation of the whole training subset would cost more than the training of the largest rows).
The engine's running loss of the last epoch is kept as train_loss_running.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from ..data import build_data
from ..models import get_config
from ..models import variants as registry
from ..train import TrainConfig, train
from ..train.checkpoint import load_model, weights_path
from ..train.evaluate import evaluate, subset_indices
from ..train.runtime import setup_runtime
from ..utils import atomic_write
from .definitions import BASE_MODEL, Recipe, Study, Variant, get_study, recipe_id, run_key
from .speed import time_variants

# Test images the engine evaluates after each epoch (only for its log: the row's val_* are measured on the
# recipe's full validation set after training).
ENGINE_VAL_IMAGES = 500

ROW_FIELDS = ("study", "variant", "layout", "train_size", "seed", "params", "train_loss", "train_top1", "val_loss",
              "val_top1", "val_top5", "gap_top1", "train_loss_running", "seconds", "epochs", "steps",
              "images_seen", "model", "recipe", "recipe_id", "run_key", "machine", "finished_at")


@dataclasses.dataclass(frozen=True)
class RowSpec:
    """One planned training run of a study."""

    variant: Variant
    train_size: int
    seed: int
    key: str  # run_key(model config, recipe, size, seed)


def model_config_dict(overrides: dict, recipe: Recipe) -> dict:
    """The resolved model config of a study model (as the engine builds it for Fashion-MNIST)."""
    return get_config(BASE_MODEL, **overrides, img_size=recipe.img_size, in_chans=1, num_classes=10).to_dict()


def plan(study: Study, seeds: Optional[tuple[int, ...]] = None,
         sizes: Optional[tuple[int, ...]] = None) -> list[RowSpec]:
    """The rows of `study`, first seed first (so an interrupted run has whole first-seed grids), then
    the further seeds at the study's repeat sizes. `seeds` / `sizes` restrict or replace the study's."""
    seeds = tuple(seeds) if seeds else study.seeds
    sizes = tuple(sizes) if sizes else study.train_sizes
    for s in sizes:
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise ValueError(f"train size {s!r} must be a positive integer")
    rows = []
    for i, seed in enumerate(seeds):
        for size in sizes:
            if i > 0 and size not in study.repeat_sizes and sizes == study.train_sizes:
                continue  # further seeds only where the study repeats (unless sizes were named explicitly)
            for v in study.variants:
                key = run_key(model_config_dict(v.overrides, study.recipe), study.recipe, size, seed)
                rows.append(RowSpec(v, size, seed, key))
    return rows


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    return (f"{platform.system()} {platform.machine()} ({cpu}), {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"python {platform.python_version()}")


def machine_load() -> dict:
    """How shared the machine was when a row ran: the process's niceness, the 1-minute load average and the CPU
    count (the report says "shared" only when these say so)."""
    return {"nice": os.nice(0), "load_avg": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()}


def study_of_rows(name: str, rows: list[dict]) -> tuple[Study, bool]:
    """(study, quick): the definition of study `name` (full or --quick, with the --steps the rows were trained
    with) whose recipe produced `rows`, as `--report-only` needs to report them against their own plan."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.get("recipe_id")] = counts.get(r.get("recipe_id"), 0) + 1
    steps = {r["recipe"]["steps"] for r in rows if isinstance(r.get("recipe"), dict) and "steps" in r["recipe"]}
    for rid in sorted(counts, key=lambda k: -counts[k]):
        for quick in (False, True):
            base = get_study(name, quick=quick)
            for study in (base, *(base.replace(recipe=dataclasses.replace(base.recipe, steps=n)) for n in sorted(steps))):
                if recipe_id(study.recipe) == rid:
                    return study, quick
    raise ValueError(f"the {name} rows were trained with a recipe this version does not define "
                     f"(recipe_id {', '.join(map(str, counts))}); rerun the study")


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


def _engine_model(variant: Variant, fields: set[str]) -> dict:
    """TrainConfig fields selecting the study model: overrides when the engine takes them, else a
    registered name (registered once per process)."""
    for name in ("model_overrides", "overrides"):
        if name in fields:
            return {"model": BASE_MODEL, name: dict(variant.overrides)}
    name = "study-" + run_key(variant.overrides, Recipe(), 0, 0)
    if name not in registry.list_models():
        overrides = dict(variant.overrides)
        registry.register(name, f"study model {variant.name}")(lambda: get_config(BASE_MODEL, **overrides))
    return {"model": name}


def train_config(spec: RowSpec, recipe: Recipe, run_dir: str | os.PathLike):
    """The coatnet.train.TrainConfig of one row."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    val_subset = ENGINE_VAL_IMAGES if recipe.val_subset is None else min(ENGINE_VAL_IMAGES, recipe.val_subset)
    size = spec.train_size
    kw = dict(data=recipe.data, img_size=recipe.img_size, train_subset=size, val_subset=val_subset,
              epochs=recipe.epochs_for(size), stop_at_step=recipe.steps, batch_size=recipe.batch_size,
              lr=recipe.lr, min_lr=recipe.lr,  # min_lr = lr: constant after warmup (see Recipe)
              warmup_epochs=recipe.warmup_steps / recipe.steps_per_epoch(size),
              weight_decay=recipe.weight_decay, clip_grad=recipe.clip_grad, label_smoothing=recipe.label_smoothing,
              augment=recipe.augment, drop_path=0.0, threads=recipe.threads, device="cpu", seed=spec.seed,
              out=str(run_dir), progress=False, quiet=True, **_engine_model(spec.variant, fields))
    return TrainConfig(**kw)


def evaluate_run(run_dir: str | os.PathLike, recipe: Recipe, train_size: int, seed: int) -> dict:
    """Eval-mode loss / top-1 / top-5 of the run's last checkpoint on a sample of its own training images
    (prefix train_) and on the validation images (prefix val_)."""
    runtime = setup_runtime("cpu", "fp32", threads=recipe.threads)
    model, spec, _ = load_model(weights_path(run_dir, "last"), runtime.device)
    train_src, val_src, _ = build_data(recipe.data, None, 0.1, spec.img_size, spec.crop_fraction, seed)
    # The engine trains on subset_indices(len, train_subset, seed, stream=1); sample from exactly those.
    train_idx = subset_indices(len(train_src), train_size, seed, stream=1)
    sample = train_idx[subset_indices(len(train_idx), recipe.train_eval_images, seed, stream=11)]
    val_idx = subset_indices(len(val_src), recipe.val_subset, seed, stream=2)
    out = {}
    for prefix, src, idx in (("train", train_src, sample), ("val", val_src, val_idx)):
        r = evaluate(model, src, idx, spec, runtime, 500, 0)
        out.update({f"{prefix}_loss": r["loss"], f"{prefix}_top1": r["top1"], f"{prefix}_top5": r["top5"],
                    f"{prefix}_images": r["n"]})
    return out


def run_row(study: Study, spec: RowSpec, train_fn: Optional[TrainFn] = None) -> dict:
    """Train and measure one row; returns the result row (ROW_FIELDS and a few more)."""
    train_fn = train if train_fn is None else train_fn
    recipe = study.recipe
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix=f"coatnet-study-{study.name}-") as run_dir:
        res = train_fn(train_config(spec, recipe, run_dir))
        seconds_train = time.time() - t0
        ev = evaluate_run(run_dir, recipe, spec.train_size, spec.seed)
    row = {
        "study": study.name, "variant": spec.variant.name, "layout": spec.variant.layout,
        "train_size": spec.train_size, "seed": spec.seed, "params": int(res["params"]),
        "train_loss": ev["train_loss"], "train_top1": ev["train_top1"],
        "val_loss": ev["val_loss"], "val_top1": ev["val_top1"], "val_top5": ev["val_top5"],
        "gap_top1": ev["train_top1"] - ev["val_top1"],
        "train_loss_running": res.get("train_loss"), "train_top1_running": res.get("train_top1"),
        "train_eval_images": ev["train_images"], "val_images": ev["val_images"],
        "seconds": seconds_train, "seconds_total": time.time() - t0,
        "epochs": res.get("epochs"), "steps": res.get("steps"),
        "images_seen": int(res.get("steps") or 0) * recipe.batch_size,
        "epochs_seen": int(res.get("steps") or 0) * recipe.batch_size / spec.train_size,
        "model": {k: list(v) if isinstance(v, tuple) else v for k, v in spec.variant.overrides.items()},
        "base_model": BASE_MODEL, "recipe": dataclasses.asdict(recipe), "recipe_id": recipe_id(recipe),
        "run_key": spec.key, "machine": machine_description(), **machine_load(),
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return row


# -- a whole study -------------------------------------------------------------------------------------
def _reusable_rows(out_dir: Path, exclude: str) -> dict[str, dict]:
    """Rows of the other studies in out_dir, by run_key: an identical run need not be trained twice."""
    found = {}
    for path in sorted(out_dir.glob("*.json")):
        if path.stem == exclude:
            continue
        try:
            rows = read_rows(path)
        except ValueError:
            continue
        for r in rows:
            if "run_key" in r and r.get("reused_from") is None:
                found.setdefault(r["run_key"], r)
    return found


def run_study(study: Study, out_dir: str | os.PathLike, seeds: Optional[tuple[int, ...]] = None,
              sizes: Optional[tuple[int, ...]] = None, train_fn: Optional[TrainFn] = None,
              log: Callable[[str], None] = print) -> list[dict]:
    """Run every planned row not yet in out_dir/<study>.json, appending each as it finishes; returns all
    rows of the file. Rows from another recipe are dropped (the file describes one experiment); rows of
    this recipe outside the plan (other seeds or sizes) are kept."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = results_path(out_dir, study.name)
    rid = recipe_id(study.recipe)
    existing = read_rows(path)
    rows = [r for r in existing if r.get("recipe_id") == rid]
    if len(rows) < len(existing):
        log(f"{path}: dropping {len(existing) - len(rows)} row(s) of another recipe")
        write_rows(path, rows)
    done = {r["run_key"] for r in rows if "run_key" in r}
    todo = [s for s in plan(study, seeds, sizes) if s.key not in done]
    reusable = _reusable_rows(out_dir, study.name)
    log(f"study {study.name}: {len(done)} row(s) already in {path}, {len(todo)} to run")
    speed: dict[str, dict] = {}
    if study.speed_benchmark and todo:
        log(f"study {study.name}: timing the variants side by side ...")
        speed = time_variants(study.variants, study.recipe, rounds=study.speed_rounds)
        log("  " + "; ".join(f"{k}: train {v['train_img_s']:.0f} img/s, inference {v['infer_img_s']:.0f} img/s"
                             for k, v in speed.items()))
    for i, spec in enumerate(todo, 1):
        tag = f"[{i}/{len(todo)}] {spec.variant.name} n={spec.train_size} seed={spec.seed}"
        if spec.key in reusable:
            row = {**reusable[spec.key], "study": study.name, "variant": spec.variant.name,
                   "reused_from": reusable[spec.key]["study"]}
            log(f"{tag}: identical run found in {row['reused_from']}.json, reused")
        else:
            log(f"{tag}: training ...")
            row = run_row(study, spec, train_fn)
            log(f"{tag}: train_loss {row['train_loss']:.4f} train_top1 {row['train_top1']:.2f} "
                f"val_top1 {row['val_top1']:.2f} gap {row['gap_top1']:.2f} ({row['seconds_total']:.0f}s)")
        if spec.variant.name in speed:
            row.update({f"bench_{k}": v for k, v in speed[spec.variant.name].items() if k != "rounds"})
        rows.append(row)
        write_rows(path, rows)
    return rows
