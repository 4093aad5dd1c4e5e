"""`coatnet train`, `coatnet eval`, `coatnet predict`: parse flags, call coatnet.train."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from . import CliError
from .config_flags import add_config_flags, flag_names

# Settings that may change when resuming a run (the rest would change what is being resumed).
_RESUME_CHANGEABLE = {"epochs", "device", "threads", "workers", "progress", "quiet", "stop_at_step", "save_every",
                      "eval_batch_size", "strict", "skip_nonfinite", "fsdp", "log"}
# Settings of fine-tuning: `coatnet finetune` has their flags (a model trained from its random start has no
# earlier layers to decay or freeze, no statistics to recalibrate).
_FINETUNE_ONLY = ("layer_decay", "freeze_stages", "recalibrate_bn")

COMMANDS = {  # command: its line in `coatnet --help`
    "train": "train a model (default: the small preset on Fashion-MNIST)",
    "eval": "evaluate a checkpoint: JSON line with top1, top5, loss, n",
    "predict": "top-k classes with probabilities for image files and folders",
}


def register(sub: argparse._SubParsersAction) -> None:
    from ..train.config import TrainConfig
    from ..train.recipes import get_recipe

    S = argparse.SUPPRESS
    p = sub.add_parser("train", help=COMMANDS["train"],
                       description="Train a CoAtNet. With no arguments: coatnet_micro on Fashion-MNIST, evaluated on "
                                   "its 10,000 test images. Flags override the recipe's settings.")
    p.add_argument("--recipe", default=S, help="named settings (see --list-recipes); default: 'default'")
    p.add_argument("--list-recipes", action="store_true", help="print the recipes and exit")
    p.add_argument("--resume", metavar="DIR", default=S, help="continue the run in DIR from its last checkpoint "
                                                                "(default: a new run)")
    p.add_argument("--auto-resume", action="store_true",
                   help="with --out DIR: start a run in DIR, or continue the one there (the same command line "
                        "restarted, e.g. by torchrun --max-restarts, carries on where it stopped)")
    flags = [f for f, s in TrainConfig.settings().items() if s.flags and f not in _FINETUNE_ONLY]
    add_config_flags(p, flags, {**TrainConfig().to_dict(), **get_recipe("default")},
                     shown={"out": "runs/<recipe>-<time>"})
    p.set_defaults(func=run_train)

    e = sub.add_parser("eval", help=COMMANDS["eval"])
    e.add_argument("--checkpoint", required=True,
                   help="a checkpoint-*.safetensors file of ours; or published weights (a tag from `coatnet "
                        "weights`, or timm's file with --model) on --data, with their own eval transform")
    e.add_argument("--model", help="the model of a timm file not named after a tag (default: the one the "
                                   "checkpoint records)")
    e.add_argument("--data", help="'fashion-mnist' or an image folder (default: the data it was trained on)")
    e.add_argument("--data-dir", help="folder of the Fashion-MNIST IDX files (default: the run's, else "
                                      "/usr/share/datasets/fashion-mnist)")
    e.add_argument("--split", choices=("val", "train", "both"), default="val",
                   help="which split; 'both' adds the train-val gap")
    e.add_argument("--val-fraction", type=float, help="held-out share when the folder has no val/ (default: the "
                                                      "run's)")
    e.add_argument("--subset", type=int, metavar="N", help="evaluate a seeded subset of N images (default: all)")
    e.add_argument("--batch-size", type=int, help="default 500 (64 for published weights at full size)")
    e.add_argument("--device", default="auto")
    e.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    e.add_argument("--workers", type=int, help="image-decoding processes (default: min(4, CPUs))")
    e.add_argument("--threads", type=int, help="CPU threads (default: all)")
    e.add_argument("--strict", action="store_true", help="fail on an unreadable image")
    e.add_argument("--img-size", type=int, help="evaluate at this input side instead of the checkpoint's "
                                                "(relative-position tables resized, no training; default: the "
                                                "checkpoint's)")
    e.add_argument("--recalibrate-bn", type=int, default=0, metavar="N",
                   help="first re-estimate the BatchNorm statistics on N training images at the input size "
                        "(eval transform, no labels, no weight changes)")
    e.add_argument("--tta", choices=("flip", "none"),
                   help="test-time augmentation: average with the mirror image ('flip') or not (default: as the "
                        "checkpoint's training run evaluated)")
    e.set_defaults(func=run_eval)

    q = sub.add_parser("predict", help=COMMANDS["predict"],
                       description="Predict image files and folders (searched recursively) in batches. Unreadable "
                                   "files inside folders are skipped with the reason on stderr; an unreadable file "
                                   "named on the command line is an error after the others are predicted.")
    q.add_argument("--checkpoint", required=True, help="a checkpoint-*.safetensors file, or a Hub-format folder")
    q.add_argument("images", nargs="+", metavar="IMAGE", help="image files and folders")
    q.add_argument("--top-k", type=int, default=5)
    q.add_argument("--json", action="store_true", help="one JSON object per image on stdout")
    q.add_argument("--output", metavar="FILE", help="write the predictions to FILE (.csv: path, label_1, prob_1, "
                                                    "..., error; .jsonl: one JSON object per image) instead of stdout "
                                                    "(default: stdout)")
    q.add_argument("--batch-size", type=int, default=64, help="images per forward (default 64)")
    q.add_argument("--workers", type=int, default=None, help="image-decoding processes (default min(4, CPUs))")
    q.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    q.add_argument("--device", default="cpu")
    q.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar on stderr")
    q.add_argument("--tta", choices=("flip", "none"),
                   help="average with the mirror image ('flip') or not (default: as the checkpoint's training run "
                        "evaluated, so that predict agrees with eval)")
    q.set_defaults(func=run_predict)


def _flag_values(args: argparse.Namespace) -> dict:
    """The TrainConfig settings given on the command line."""
    return {k: v for k, v in vars(args).items()
            if k not in ("command", "func", "debug", "recipe", "list_recipes", "resume", "auto_resume")}


def build_config(args: argparse.Namespace, existing_run: bool | None = None):
    """TrainConfig from the recipe (or a resumed run's config.json) and the flags. With --auto-resume,
    `existing_run` says whether --out already holds a run (None: look now), which is then continued."""
    from ..train import TrainConfig, get_recipe

    flags = _flag_values(args)
    if getattr(args, "auto_resume", False):
        if hasattr(args, "resume"):
            raise CliError("--auto-resume continues the run in --out; drop --resume")
        if not flags.get("out"):
            raise CliError("--auto-resume needs --out DIR (the run folder that a restart continues)")
        if existing_run is None:
            existing_run = (Path(flags["out"]) / "config.json").is_file()
        if existing_run:
            recipe = getattr(args, "recipe", None)
            cfg = _resumed_config(Path(flags["out"]), {k: v for k, v in flags.items() if k != "out"}, recipe,
                                  "--auto-resume")
            # The command line is the whole story of a restart: what it leaves out of the settings a resume may
            # change takes the recipe's value, not the earlier start's (e.g. an earlier --stop-at-step).
            fresh = TrainConfig().replace(**get_recipe(recipe or cfg.recipe or "default")).replace(**flags)
            return cfg.replace(**{k: getattr(fresh, k) for k in _RESUME_CHANGEABLE if k not in flags})
    elif hasattr(args, "resume"):
        if hasattr(args, "recipe"):
            raise CliError("--resume takes the settings of the run; drop --recipe")
        return _resumed_config(Path(args.resume), flags, None, "--resume")
    name = getattr(args, "recipe", "default")
    cfg = TrainConfig().replace(**get_recipe(name)).replace(**flags)
    if cfg.out is None:
        cfg = cfg.replace(out=str(Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"))
    return cfg


def _resumed_config(run_dir: Path, flags: dict, recipe: str | None, how: str):
    """The settings of the run in `run_dir` (its config.json) with the `flags` a resume may change; any
    other flag must repeat the run's value (so that --auto-resume's unchanged command line passes)."""
    from ..train import TrainConfig
    from ..utils import read_json_object

    cfg_file = run_dir / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{how} {run_dir}: no config.json there (not a run folder)")
    try:
        saved = read_json_object(cfg_file)
    except ValueError as e:
        raise CliError(f"{how} {run_dir}: {e} (not the run's settings)") from None
    cfg = TrainConfig.from_dict(saved)
    if recipe is not None and recipe != cfg.recipe:
        raise CliError(f"{how}: {run_dir} holds a run of recipe {cfg.recipe!r}, not {recipe!r}")
    # Compared as settings (replace coerces): a flag's list is the tuple that config.json's list was read as.
    given = cfg.replace(**{k: v for k, v in flags.items() if k not in _RESUME_CHANGEABLE})
    fixed = sorted(k for k in flags if k not in _RESUME_CHANGEABLE and getattr(given, k) != getattr(cfg, k))
    if fixed:
        raise CliError(f"cannot change {flag_names(fixed)} when resuming {run_dir} (these may change: "
                       f"{flag_names(_RESUME_CHANGEABLE)})")
    return cfg.replace(**flags, out=str(run_dir), resume=True)


def train_noting_interruption(cfg):
    """`coatnet.train.train(cfg)`; on Ctrl-C, the KeyboardInterrupt says what the run folder keeps and how to
    continue (shown as the error line)."""
    from ..train import train
    from ..train.engine import interrupted_note

    try:
        return train(cfg)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(interrupted_note(cfg.out)) from None


def run_train(args: argparse.Namespace) -> int:
    from ..train.distributed import broadcast_object, init_distributed, is_main
    from ..train.engine import check_model
    from ..train.recipes import describe_recipe, list_recipes
    from ..utils import plural, rounded

    if args.list_recipes:
        for name in list_recipes():
            print(f"{name}: {describe_recipe(name)}")
        return 0
    # Under torchrun every process runs this; the run folder named by rank 0's clock is everyone's.
    init_distributed()
    out = getattr(args, "out", None)
    # --auto-resume: rank 0 decides whether the folder holds a run, so every process takes the same branch.
    existing = broadcast_object(Path(out, "config.json").is_file()) if args.auto_resume and out else None
    cfg = build_config(args, existing).validate()
    check_model(cfg)  # an unknown model or a size it does not take: named before the run folder line
    cfg = cfg.replace(out=broadcast_object(cfg.out))
    if not cfg.quiet and is_main():
        print(f"run folder: {cfg.out}  (model {cfg.model}, data {cfg.data}, {plural(cfg.epochs, 'epoch')}, "
              f"batch {cfg.batch_size}, recipe {cfg.recipe or '-'})", flush=True)
    result = train_noting_interruption(cfg)
    if result.get("complete_before"):  # nothing trained (the warning says so): its summary was printed when it ended
        return 0
    if is_main():
        if result.get("train_gflops"):
            _hardware_use(result, quiet=cfg.quiet)
        print(json.dumps(rounded(result)))
    return 0


def _hardware_use(result: dict, quiet: bool) -> None:
    """Add to `result` the training GFLOP/s as a fraction of an fp32 2048 x 2048 matmul timed now, in this
    process (the machine's practical peak), and say it in one line."""
    from ..bench import matmul_gflops
    from ..train.runtime import resolve_device

    peak = matmul_gflops(resolve_device(result.get("device", "auto")))
    result.update(matmul_gflops=round(peak, 1), gflops_fraction=round(result["train_gflops"] / peak, 3))
    if not quiet:
        print(f"hardware use: {result['train_gflops']:.1f} GFLOP/s in training ({result['macs_per_image'] / 1e6:.2f}M "
              f"multiply-adds x 6 per image) = {result['gflops_fraction']:.2f} of an fp32 2048x2048 matmul here "
              f"({peak:.0f} GFLOP/s)", flush=True)


def run_eval(args: argparse.Namespace) -> int:
    from ..models.pretrained import weights_of
    from ..train import evaluate_checkpoint
    from ..train.finetune import checkpoint_run
    from ..utils import rounded

    if args.model and checkpoint_run(args.checkpoint):
        raise CliError(f"--model is for timm's files: {args.checkpoint} records its own model")
    if args.model or weights_of(args.checkpoint):  # published weights: a tag, a file named after one, timm's file
        from ..train.evaluate import evaluate_published

        if args.data is None:
            raise CliError(f"{args.checkpoint} is not one of our checkpoints: pass --data FOLDER of its classes")
        if args.split != "val" or args.recalibrate_bn or args.val_fraction is not None:
            raise CliError("--split, --val-fraction and --recalibrate-bn apply to our checkpoints only")
        result = evaluate_published(args.checkpoint, args.data, args.model, args.img_size, args.subset,
                                    64 if args.batch_size is None else args.batch_size, args.device,
                                    args.precision, args.workers, args.strict, args.threads)
        print(json.dumps(rounded(result)))
        return 0
    result = evaluate_checkpoint(args.checkpoint, data=args.data, data_dir=args.data_dir, split=args.split,
                                 val_fraction=args.val_fraction, subset=args.subset,
                                 batch_size=500 if args.batch_size is None else args.batch_size,
                                 device=args.device, precision=args.precision, workers=args.workers,
                                 strict=args.strict, img_size=args.img_size, recalibrate_bn=args.recalibrate_bn,
                                 threads=args.threads, tta_flip=None if args.tta is None else args.tta == "flip")
    print(json.dumps(rounded(result)))
    return 0


def run_predict(args: argparse.Namespace) -> int:
    import contextlib
    import os
    import sys

    from ..data.images import list_image_files
    from ..train.checkpoint import load_model
    from ..train.predict import PredictionWriter, checkpoint_tta_flip, iter_predictions
    from ..train.runtime import setup_runtime

    if args.top_k < 1:
        raise CliError("--top-k must be at least 1")
    if args.batch_size < 1:
        raise CliError("--batch-size must be at least 1")
    files = list_image_files(args.images)  # before loading the model: the cheap mistakes first
    if args.output:
        PredictionWriter.check(args.output)
    named = {p for p in args.images if not os.path.isdir(p)}
    runtime = setup_runtime(args.device, "fp32", threads=args.threads)
    model, spec, info = load_model(args.checkpoint, runtime.device)
    tta_flip = checkpoint_tta_flip(info) if args.tta is None else args.tta == "flip"
    workers = min(4, os.cpu_count() or 1) if args.workers is None else args.workers
    writer = PredictionWriter(args.output, min(args.top_k, len(spec.classes))) if args.output else None
    # Like cat(1): every readable image is predicted, then one error line names the named files that were not;
    # unreadable files found in folders are skipped with a warning, as training skips them.
    failed, skipped, predicted, t0 = [], [], 0, time.time()
    # Columns aligned while streaming: the widths are known before the first line (every path, every class).
    path_width, class_width = max(len(str(f)) for f in files), max(len(c) for c in spec.classes)
    with writer or contextlib.nullcontext():  # the output file appears only when complete
        for res in iter_predictions(model, spec, files, args.top_k, args.batch_size, workers,
                                    progress=args.progress and len(files) > args.batch_size, tta_flip=tta_flip):
            if writer is not None:
                writer.write(res)
            if "error" in res:
                if res["image"] in named:
                    failed.append(res)
                else:
                    skipped.append(res)
                    print(f"warning: skipping unreadable file {res['image']}: {res['error']}", file=sys.stderr,
                          flush=True)
                continue
            predicted += 1
            if writer is None:
                print(json.dumps(res) if args.json else
                      f"{res['image']:<{path_width}}  " + "  ".join(f"{t['class']:<{class_width}} {t['prob']:.4f}"
                                                                   for t in res["top"]).rstrip(), flush=True)
    seconds = time.time() - t0
    if writer is not None:
        print(json.dumps({"output": str(args.output), "predicted": predicted, "unreadable": len(failed) + len(skipped),
                          "seconds": round(seconds, 3), "img_per_s": round(len(files) / max(seconds, 1e-9), 1)}))
    if skipped:
        print(f"warning: skipped {len(skipped)} unreadable file{'s' if len(skipped) > 1 else ''} "
              f"of {len(files)}", file=sys.stderr)
    if failed:
        first = f"{failed[0]['image']}: {failed[0]['error']}"
        if len(files) == 1:
            raise CliError(f"cannot read image {first}")
        more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        raise CliError(f"cannot read {len(failed)} of {len(files)} images: {first}{more}")
    return 0
