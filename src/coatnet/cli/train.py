"""`coatnet train`, `coatnet eval`, `coatnet predict`: parse flags, call coatnet.train."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from . import CliError, state_defaults

# Settings that may change when resuming a run (the rest would change what is being resumed).
_RESUME_CHANGEABLE = {"epochs", "device", "threads", "workers", "progress", "quiet", "stop_at_step", "save_every",
                      "eval_batch_size", "strict", "skip_nonfinite", "fsdp", "log"}
_TRAIN_FLAGS: dict[str, str] = {}  # TrainConfig field -> its flag(s) in `coatnet train`, filled by register()

# What TrainConfig's None defaults mean, for --help.
TRAIN_NONE_MEANS = {
    "resume": "a new run", "data_dir": "/usr/share/datasets/fashion-mnist", "train_subset": "all",
    "val_subset": "all",
    "img_size": "32 for Fashion-MNIST; for a folder the images' median side, rounded to one the model takes",
    "crop_fraction": "1.0 for Fashion-MNIST, 0.875 for folders", "workers": "min(4, CPUs)",
    "layout": "the model's", "micro_batch_size": "--batch-size", "threads": "all CPUs",
    "stop_at_step": "none", "log": "none", "out": "runs/<recipe>-<time>",
}

COMMANDS = {  # command: its line in `coatnet --help`
    "train": "train a model (default: the small preset on Fashion-MNIST)",
    "eval": "evaluate a checkpoint: JSON line with top1, top5, loss, n",
    "predict": "top-k classes with probabilities for image files and folders",
}


def _flags(fields) -> str:
    """The `coatnet train` flags of TrainConfig fields, as a user types them (fields without a flag left out)."""
    return ", ".join(sorted({_TRAIN_FLAGS[f] for f in fields if f in _TRAIN_FLAGS}))


def register(sub: argparse._SubParsersAction) -> None:
    from ..train.config import TrainConfig
    from ..train.recipes import get_recipe

    d = TrainConfig()
    S = argparse.SUPPRESS
    p = sub.add_parser("train", help=COMMANDS["train"],
                       description="Train a CoAtNet. With no arguments: coatnet_nano on Fashion-MNIST, evaluated on "
                                   "its 10,000 test images. Flags override the recipe's settings.")
    p.add_argument("--recipe", default=S, help="named settings (see --list-recipes); default: 'default'")
    p.add_argument("--list-recipes", action="store_true", help="print the recipes and exit")
    p.add_argument("--resume", metavar="DIR", default=S, help="continue the run in DIR from its last checkpoint")
    p.add_argument("--auto-resume", action="store_true",
                   help="with --out DIR: start a run in DIR, or continue the one there (the same command line "
                        "restarted, e.g. by torchrun --max-restarts, carries on where it stopped)")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=S, help=f"'fashion-mnist' or an ImageFolder root (default {d.data})")
    g.add_argument("--data-dir", default=S, help="folder of the Fashion-MNIST IDX files")
    g.add_argument("--val-fraction", type=float, default=S, help=f"held-out share of a folder without val/ ({d.val_fraction})")
    g.add_argument("--train-subset", type=int, default=S, metavar="N", help="train on a seeded subset of N images")
    g.add_argument("--val-subset", type=int, default=S, metavar="N", help="evaluate on a seeded subset of N images")
    g.add_argument("--img-size", type=int, default=S,
                   help="input side, a multiple of the model's total stride (32; 8 for coatnet_micro)")
    g.add_argument("--crop-fraction", type=float, default=S, help="eval centre-crop fraction (1.0 / 0.875)")
    g.add_argument("--workers", type=int, default=S, help="DataLoader workers for image folders")
    g.add_argument("--strict", action="store_const", const=True, default=S, help="fail on an unreadable image")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=S, help=f"registered variant (default {d.model}); see `coatnet models`")
    g.add_argument("--layout", default=S, help="block types of S1..S4 instead of the model's, e.g. C-T-T-T "
                                               "(C: MBConv, T: Transformer)")
    g.add_argument("--drop-path", type=float, default=S, help="stochastic depth rate")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=S, help=f"default {d.epochs}")
    g.add_argument("--min-epoch-images", type=int, default=S, metavar="N",
                   help="repeat a smaller training set within each epoch (reshuffled, augmented anew) until an "
                        f"epoch holds N images (default {d.min_epoch_images}; 0: one pass)")
    g.add_argument("--batch-size", type=int, default=S, help=f"global batch per optimizer step (default {d.batch_size})")
    g.add_argument("--micro-batch-size", type=int, default=S,
                   help="images per forward/backward: gradients accumulate to --batch-size")
    g.add_argument("--lr", type=float, default=S, help=f"peak learning rate (default {d.lr})")
    g.add_argument("--min-lr", type=float, default=S, help=f"floor of the decay (default {d.min_lr})")
    g.add_argument("--warmup-epochs", type=float, default=S, help=f"linear warmup (default {d.warmup_epochs})")
    g.add_argument("--schedule", choices=("cosine", "linear", "constant"), default=S,
                   help="after warmup: decay to --min-lr, or constant")
    g.add_argument("--weight-decay", type=float, default=S, help=f"AdamW decay (default {d.weight_decay})")
    g.add_argument("--clip-grad", type=float, default=S, help="max gradient norm (0: off)")
    g.add_argument("--ema-decay", type=float, default=S, help="EMA of weights per step (0: off)")
    g.add_argument("--ema-warmup", action=argparse.BooleanOptionalAction, default=S,
                   help="EMA decay min(--ema-decay, (1+t)/(10+t)) at step t, so that a short run's average moves "
                        f"(default {'on' if d.ema_warmup else 'off'})")
    g = p.add_argument_group("augmentation")
    g.add_argument("--no-augment", dest="augment", action="store_const", const=False, default=S,
                   help="no random augmentation at all")
    g.add_argument("--crop-scale", type=float, nargs=2, metavar=("LO", "HI"), default=S,
                   help=f"random resized crop area range (default {d.crop_scale[0]} {d.crop_scale[1]})")
    g.add_argument("--hflip", type=float, default=S, help="horizontal flip probability")
    g.add_argument("--randaugment", type=float, nargs=2, metavar=("N", "M"), default=S,
                   help="RandAugment ops per image and magnitude 0..30 (paper: 2 15)")
    g.add_argument("--mixup", type=float, default=S, help="Mixup alpha (paper 0.8)")
    g.add_argument("--cutmix", type=float, default=S, help="CutMix alpha")
    g.add_argument("--label-smoothing", type=float, default=S, help="(paper 0.1)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--no-tta", dest="tta_flip", action="store_const", const=False, default=S,
                   help="score images alone (default: averaged with their mirror image when training flips)")
    g.add_argument("--precise-bn", type=int, default=S, metavar="N",
                   help="re-estimate BatchNorm statistics on N training images before each evaluation and "
                        f"checkpoint (default {d.precise_bn}; 0: off)")
    g = p.add_argument_group("runtime")
    g.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=S,
                   help="auto (default): bf16 autocast where the hardware has bf16 (CUDA, CPUs with AVX512-BF16 or AMX), "
                        "else fp32")
    g.add_argument("--device", default=S, help="auto, cpu, cuda, cuda:N")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=S,
                   help=f"NHWC memory format for the convolutions (default {'on' if d.channels_last else 'off'})")
    g.add_argument("--compile", action="store_const", const=True, default=S, help="torch.compile the model")
    g.add_argument("--threads", type=int, default=S, help="CPU threads (default: all)")
    g.add_argument("--fsdp", action="store_const", const=True, default=S,
                   help="under torchrun: shard weights, gradients and optimizer states, recompute activations")
    g.add_argument("--no-fsdp", dest="fsdp", action="store_const", const=False, default=S,
                   help="replicate the model (DDP): e.g. to resume an --fsdp run in fewer processes")
    g.add_argument("--no-sync-bn", dest="sync_bn", action="store_const", const=False, default=S,
                   help="under torchrun: BatchNorm statistics of each process's slice only")
    g.add_argument("--seed", type=int, default=S)
    g.add_argument("--deterministic", action="store_const", const=True, default=S,
                   help="deterministic kernels (resumed == uninterrupted)")
    g = p.add_argument_group("run folder")
    g.add_argument("--out", default=S, help="run folder (default runs/<recipe>-<time>)")
    g.add_argument("--save-every", type=int, default=S, metavar="STEPS", help="also checkpoint every STEPS steps")
    g.add_argument("--stop-at-step", type=int, default=S, help="stop (checkpointed) after this many steps")
    g.add_argument("--eval-train", action="store_const", const=True, default=S,
                   help="also evaluate the training set (eval mode, no augmentation) each epoch")
    g.add_argument("--skip-nonfinite", action="store_const", const=True, default=S,
                   help="skip steps with a NaN/inf loss instead of stopping")
    g.add_argument("--no-progress", dest="progress", action="store_const", const=False, default=S,
                   help="no progress bar (there is none when stderr is not a terminal)")
    g.add_argument("--quiet", action="store_const", const=True, default=S, help="no per-epoch lines")
    g.add_argument("--log", default=S, metavar="TRACKER",
                   help="also log to tensorboard (event files in DIR/tensorboard) or wandb (Weights & Biases; "
                        "WANDB_MODE=offline keeps it local), or 'tensorboard,wandb': loss, lr, img/s per step, "
                        "val metrics and a few predicted images per epoch")
    p.set_defaults(func=run_train)
    state_defaults(p, {**d.to_dict(), **get_recipe("default")}, TRAIN_NONE_MEANS)
    for action in p._actions:
        if action.option_strings and action.dest not in ("help", "recipe", "list_recipes", "resume"):
            for field in {"randaugment": ("randaugment_n", "randaugment_m")}.get(action.dest, (action.dest,)):
                _TRAIN_FLAGS[field] = "/".join(filter(None, (_TRAIN_FLAGS.get(field), action.option_strings[0])))

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
    values = {k: v for k, v in vars(args).items()
              if k not in ("command", "func", "debug", "recipe", "list_recipes", "resume", "auto_resume")}
    if "randaugment" in values:
        n, m = values.pop("randaugment")
        if n != int(n) or n < 0:
            raise CliError(f"--randaugment N must be a non-negative integer, got {n}")
        values.update(randaugment_n=int(n), randaugment_m=m)
    if values.get("clip_grad") == 0:
        values["clip_grad"] = None
    return values


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
    fixed = sorted(k for k, v in flags.items() if k not in _RESUME_CHANGEABLE and getattr(cfg, k) != v)
    if fixed:
        raise CliError(f"cannot change {_flags(fixed)} when resuming {run_dir} (these may change: "
                       f"{_flags(_RESUME_CHANGEABLE)})")
    return cfg.replace(**flags, out=str(run_dir), resume=True)


def run_train(args: argparse.Namespace) -> int:
    from ..train import train
    from ..train.distributed import broadcast_object, init_distributed, is_main
    from ..train.engine import check_model, interrupted_note
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
    try:
        result = train(cfg)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(interrupted_note(cfg.out)) from None
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
    from ..train.predict import PredictionWriter, checkpoint_flip, iter_predictions
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
    flip = checkpoint_flip(info) if args.tta is None else args.tta == "flip"
    workers = min(4, os.cpu_count() or 1) if args.workers is None else args.workers
    writer = PredictionWriter(args.output, min(args.top_k, len(spec.classes))) if args.output else None
    # Like cat(1): every readable image is predicted, then one error line names the named files that were not;
    # unreadable files found in folders are skipped with a warning, as training skips them.
    failed, skipped, predicted, t0 = [], [], 0, time.time()
    # Columns aligned while streaming: the widths are known before the first line (every path, every class).
    path_width, class_width = max(len(str(f)) for f in files), max(len(c) for c in spec.classes)
    with writer or contextlib.nullcontext():  # the output file appears only when complete
        for res in iter_predictions(model, spec, files, args.top_k, args.batch_size, workers,
                                    progress=args.progress and len(files) > args.batch_size, flip=flip):
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
