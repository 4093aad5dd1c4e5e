"""TrainConfig: every setting of a training run, as one frozen dataclass (saved as config.json).

This module loads no torch (nor anything of ours that does): `coatnet train --help` builds its flags from these
fields and defaults in a fraction of a second. Whether `model` names a registered variant is checked where the
registry is loaded: `train()`, `finetune_config` and the CLI, before anything is written."""
from __future__ import annotations

import ast
import dataclasses
import importlib.util
import typing
from dataclasses import dataclass
from typing import Any, Optional

from ..device_plan import PRECISIONS
from ..utils import data_folder_error, did_you_mean
from .schedule import SCHEDULES

TRACKERS = ("tensorboard", "wandb")


def parse_log(log: str | None) -> tuple[str, ...]:
    """"tensorboard", "wandb", "tensorboard,wandb" (or None) -> the trackers named; ValueError for unknown
    ones and for those whose package is not installed (before anything is written)."""
    kinds = tuple(k.strip() for k in (log or "").split(",") if k.strip())
    for kind in kinds:
        if kind not in TRACKERS:
            raise ValueError(f"log={log!r}: unknown tracker {kind!r}; use {' or '.join(TRACKERS)} (comma-separated "
                             f"for both)")
        if importlib.util.find_spec(kind) is None:
            raise ValueError(f"--log {kind} needs the {kind} package: pip install 'coatnet[{kind}]'")
    return kinds


# Model config fields that other settings decide: the data (classes, channels, size) and their own flags.
_MODEL_ARGS_SET_ELSEWHERE = {"num_classes": "the data's class count", "in_chans": "the data's channels",
                             "img_size": "--img-size", "drop_path_rate": "--drop-path", "layout": "--layout"}


def parse_model_args(model_args: tuple[str, ...], set_elsewhere: dict[str, str] | None = None) -> dict[str, Any]:
    """("stem_stride=1", "strides=2,2,2,1", "transformer.norm=layernorm") -> {"stem_stride": 1, "strides":
    (2, 2, 2, 1), "transformer.norm": "layernorm"}: each value a Python literal (lists become tuples), else the
    string itself. ValueError, naming the word, for a word without KEY=, a key given twice, or a field that
    another setting decides (`set_elsewhere`: field -> that setting; default: training's). Whether the keys are
    fields of the model's config is checked with the registry (engine.check_model)."""
    set_elsewhere = _MODEL_ARGS_SET_ELSEWHERE if set_elsewhere is None else set_elsewhere
    out: dict[str, Any] = {}
    for word in model_args:
        key, eq, text = word.partition("=")
        key = key.strip()
        if not eq or not key or not all(part.isidentifier() for part in key.split(".")):
            raise ValueError(f"model_args: {word!r} is not KEY=VALUE (e.g. stem_stride=1)")
        field = key.rpartition(".")[2]
        if field in set_elsewhere:
            raise ValueError(f"model_args: {key} is set by {set_elsewhere[field]}, not --model-arg")
        if key in out:
            raise ValueError(f"model_args: {key} is given twice")
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            value = text.strip()
        out[key] = tuple(value) if isinstance(value, list) else value
    return out


def _is_a(value: Any, hint: Any) -> bool:
    """isinstance for the field types of TrainConfig: bool, int, float (an int is a float, a bool is neither a
    float nor an int), str, tuple[X, Y] and tuple[X, ...]."""
    if typing.get_origin(hint) is tuple:
        items = typing.get_args(hint)
        if len(items) == 2 and items[1] is Ellipsis:
            return isinstance(value, tuple) and all(_is_a(v, items[0]) for v in value)
        return (isinstance(value, tuple) and len(value) == len(items)
                and all(_is_a(v, t) for v, t in zip(value, items)))
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


@dataclass(frozen=True)
class Setting:
    """What a TrainConfig field means and how the command line sets it (`coatnet train`, `coatnet finetune`:
    the CLI builds its flags from these, so a setting's default, help, choices and flag live in one place)."""

    help: str  # the meaning, as --help shows it (the CLI appends the default)
    flags: tuple[str, ...]  # the spellings; (): no flag (the help says how it is set). A bool field's "--x" sets
    #                         True and "--no-x" sets False; both: a pair. Fields sharing a flag each take one of
    #                         its values, in field order (--randaugment N M)
    metavar: str | tuple[str, ...] | None = None  # the value's name in --help (None: the field's, in capitals)
    choices: Optional[tuple[str, ...]] = None  # the values allowed (validate() checks them too)
    none: Optional[str] = None  # what a default of None means, shown as the default in --help
    none_as: Optional[float] = None  # a value that also means None, and is stored as None (clip_grad 0: off)
    section: str = ""  # the group of --help it is shown in


def setting(default: Any, flags: str | tuple[str, ...] | None, help: str, *,
            metavar: str | tuple[str, ...] | None = None,
            choices: tuple[str, ...] | None = None, none: str | None = None, none_as: float | None = None,
            section: str = "") -> Any:
    """A TrainConfig field: its default, its flag(s) (None: none), its help, and how the help shows it.
    `section` names the --help group that this field starts; the fields after it belong to it too."""
    flags = () if flags is None else (flags,) if isinstance(flags, str) else tuple(flags)
    return dataclasses.field(default=default, metadata={"setting": Setting(help, flags, metavar, choices, none,
                                                                           none_as, section)})


@dataclass(frozen=True)
class TrainConfig:
    """All settings of `coatnet.train.train`. The defaults are the `default` recipe (train/recipes.py):
    coatnet_micro on Fashion-MNIST, 92% test top-1 in under 10 minutes on 2 CPU cores.

    Each field: its default, its flag in `coatnet train`/`coatnet finetune` (None: no flag), its help, and for a
    field that may be None what None means (`none`); `replace(x=None)` sets None."""

    data: str = setting("fashion-mnist", "--data", "'fashion-mnist' or an ImageFolder root (train/ and val/, "
                        "or class folders)", section="data")
    data_dir: Optional[str] = setting(None, "--data-dir", "folder of the Fashion-MNIST IDX files",
                                      none="/usr/share/datasets/fashion-mnist")
    val_fraction: float = setting(0.1, "--val-fraction", "held-out share of each class when a folder has no "
                                  "train/ and val/")
    train_subset: Optional[int] = setting(None, "--train-subset", "train on a seeded subset of N images",
                                          metavar="N", none="all")
    val_subset: Optional[int] = setting(None, "--val-subset", "evaluate on a seeded subset of N val images",
                                        metavar="N", none="all")
    img_size: Optional[int] = setting(None, "--img-size", "input side, a multiple of the model's total stride "
                                      "(32; 8 for coatnet_micro)", none="32 for Fashion-MNIST; for a folder the "
                                      "images' median side, rounded to one the model takes")
    crop_fraction: Optional[float] = setting(None, "--crop-fraction", "eval centre-crop fraction",
                                             none="1.0 for Fashion-MNIST, 0.875 for folders")
    workers: Optional[int] = setting(None, "--workers", "DataLoader worker processes for image folders",
                                     none="min(4, CPUs)")
    strict: bool = setting(False, "--strict", "fail on an unreadable image instead of skipping it (and naming "
                           "it in the log)")

    model: str = setting("coatnet_micro", "--model", "registered variant (see `coatnet models`)", section="model")
    layout: Optional[str] = setting(None, "--layout", "block types of S1..S4 instead of the model's, e.g. "
                                    "C-T-T-T (C: MBConv, T: Transformer)", none="the model's")
    model_args: tuple[str, ...] = setting((), "--model-arg", "set fields of the model's config, each KEY=VALUE: "
                                          "e.g. stem_stride=1 strides=2,2,2,1 transformer.norm=layernorm (the "
                                          "fields: `coatnet models --config NAME`; values are Python literals, "
                                          "else strings; the flag may repeat)", metavar="KEY=VALUE", none="none")
    drop_path: float = setting(0.0, "--drop-path", "stochastic depth: the maximum rate, reached at the last "
                               "block")
    pretrained: Optional[str] = setting(None, None, "start from these weights (ours, timm's, or a tag): "
                                        "fine-tuning, set by `coatnet finetune --checkpoint`; a head for another "
                                        "class count is replaced, tables are resized to img_size", none="random "
                                        "initialisation")
    layer_decay: float = setting(1.0, "--layer-decay", "layer-wise lr decay: block d of D (stem 0, head D) "
                                 "trains at lr * layer_decay^(D-d) (1: off)")
    freeze_stages: int = setting(0, "--freeze-stages", "keep the stem and the first N built stages fixed "
                                 "(weights and BatchNorm statistics)", metavar="N")
    eval_before: bool = setting(False, None, "evaluate once before the first step (`coatnet finetune` does: the "
                                "accuracy it starts from)")
    recalibrate_bn: int = setting(0, "--recalibrate-bn", "before the first step (and before freezing stages): "
                                  "re-estimate the BatchNorm statistics on N training images at the input size "
                                  "(eval transform, no labels; train.recalibrate); 0: off", metavar="N")

    epochs: int = setting(7, "--epochs", "passes over the training set (each of at least --min-epoch-images "
                          "images)", section="optimisation")
    min_epoch_images: int = setting(0, "--min-epoch-images", "repeat a smaller training set within each epoch "
                                    "(reshuffled, augmented anew) until an epoch holds N images, so that --epochs "
                                    "gives enough optimizer steps at any data size; 0: one pass", metavar="N")
    batch_size: int = setting(256, "--batch-size", "global batch per optimizer step (all processes and "
                              "accumulation together)")
    micro_batch_size: Optional[int] = setting(None, "--micro-batch-size", "images per forward/backward: "
                                              "gradients accumulate to --batch-size", none="--batch-size")
    lr: float = setting(3e-3, "--lr", "peak learning rate (AdamW)")
    min_lr: float = setting(1e-5, "--min-lr", "floor the schedule decays to")
    warmup_epochs: float = setting(0.3, "--warmup-epochs", "linear warmup from 0, in epochs (fractions allowed)")
    schedule: str = setting("cosine", "--schedule", "after warmup: cosine or linear decay to --min-lr, or "
                            "constant (fine-tuning)", choices=SCHEDULES)
    weight_decay: float = setting(0.05, "--weight-decay", "AdamW decoupled decay (never on norms, biases, bias "
                                  "tables)")
    betas: tuple[float, float] = setting((0.9, 0.999), None, "AdamW betas (Python and config.json only)")
    clip_grad: Optional[float] = setting(1.0, "--clip-grad", "clip the global gradient norm to this (0: off)",
                                         none="off", none_as=0)
    ema_decay: float = setting(0.0, "--ema-decay", "exponential moving average of the weights per step, "
                               "evaluated and saved (0: off)")
    ema_warmup: bool = setting(False, ("--ema-warmup", "--no-ema-warmup"), "EMA decay min(--ema-decay, "
                               "(1+t)/(10+t)) at step t (TensorFlow's num_updates rule), so that a short run's "
                               "average follows the weights instead of holding the first ones")

    augment: bool = setting(True, "--no-augment", "no random augmentation at all (training images get the eval "
                            "transform)", section="augmentation")
    crop_scale: tuple[float, float] = setting((1.0, 1.0), "--crop-scale", "random resized crop area range "
                                              "(paper/ImageNet: 0.08 1)", metavar=("LO", "HI"))
    hflip: float = setting(0.5, "--hflip", "horizontal flip probability")
    translate: int = setting(0, "--translate", "shift each training image by -N..N whole pixels along x and y "
                             "after the crop, zeros filling in (the pad-and-crop of CIFAR and Fashion-MNIST; not "
                             "in the paper); 0: off", metavar="N")
    randaugment_n: int = setting(0, "--randaugment", "RandAugment ops per image and magnitude 0..30 (paper: 2 "
                                 "15); 0 ops: off", metavar="N")
    randaugment_m: float = setting(15.0, "--randaugment", "RandAugment magnitude 0..30 (paper: 15)", metavar="M")
    mixup: float = setting(0.0, "--mixup", "Mixup Beta alpha (paper: 0.8); 0: off")
    cutmix: float = setting(0.0, "--cutmix", "CutMix Beta alpha; 0: off")
    random_erase: float = setting(0.0, "--random-erase", "random erasing (Zhong et al. 2020; not in the paper): "
                                  "the probability that an image has one box of 2-33%% of its area, aspect 0.3-3.3, "
                                  "set to the mean; 0: off", metavar="P")
    label_smoothing: float = setting(0.1, "--label-smoothing", "label smoothing (paper: 0.1)")

    eval_batch_size: int = setting(500, None, "images per evaluation forward (Python and config.json only)",
                                   section="evaluation")
    # Flip averaging only when training flips images (hflip > 0): a model that never saw mirrors is not asked to
    # judge them (tta_flip_in_eval).
    tta_flip: bool = setting(True, "--no-tta", "score images alone (default: averaged with their mirror image "
                             "when training flips)")
    # Evaluation (precise BN, flip averaging, the whole validation set) costs about a tenth of an epoch of a
    # small model on a 2-core CPU; a long run may spend that every few epochs instead.
    eval_every: int = setting(1, "--eval-every", "evaluate (precise BN, validation scores, best checkpoint) after "
                              "every N-th epoch and the last; the epochs between record the training loss and "
                              "accuracy only", metavar="N")
    # Statistics re-estimated so that no checkpoint carries ones that lag its weights (they trail by ~1/momentum
    # steps).
    precise_bn: int = setting(2048, "--precise-bn", "re-estimate BatchNorm statistics on N training images "
                              "(eval transform, train/recalibrate.py) before each evaluation (the checkpoint "
                              "written after it holds them); 0: off", metavar="N")

    precision: str = setting("auto", "--precision", "bf16 (autocast on CPU and GPU), fp32, or auto: bf16 where "
                             "the hardware has it natively (CUDA; CPUs with AVX512-BF16 or AMX), else fp32 "
                             "(train.runtime)", choices=PRECISIONS, section="runtime")
    device: str = setting("auto", "--device", "auto (cuda if available), cpu, cuda, cuda:N, ...")
    channels_last: bool = setting(True, ("--channels-last", "--no-channels-last"), "NHWC memory format for the "
                                  "convolutions (2-core CPU: 1.6x NCHW's img/s)")
    compile: bool = setting(False, "--compile", "torch.compile the model")
    threads: Optional[int] = setting(None, "--threads", "CPU threads for torch (shared by torchrun's local "
                                     "processes)", none="all CPUs")
    fsdp: bool = setting(False, ("--fsdp", "--no-fsdp"), "under torchrun: shard weights, gradients and AdamW "
                         "states (FSDP2) and recompute activations; --no-fsdp replicates the model (DDP), e.g. to "
                         "resume an --fsdp run in fewer processes")
    sync_bn: bool = setting(True, "--no-sync-bn", "under torchrun: BatchNorm statistics of each process's slice "
                            "only (default: over the global batch)")
    seed: int = setting(0, "--seed", "model init, data order, subsets, augmentation")
    deterministic: bool = setting(False, "--deterministic", "deterministic kernels (a resumed run then equals "
                                  "an uninterrupted one)")

    out: Optional[str] = setting(None, "--out", "run folder", none="none, nothing written", section="run folder")
    resume: bool = setting(False, None, "continue from out/checkpoint-last.* (from the start when none exists); "
                           "`coatnet train --resume DIR` sets it with out")
    save_every: int = setting(0, "--save-every", "also checkpoint every STEPS optimizer steps (0: at epoch ends "
                              "only)", metavar="STEPS")
    stop_at_step: Optional[int] = setting(None, "--stop-at-step", "stop (after checkpointing) once this many "
                                          "steps are done", none="none")
    eval_train: bool = setting(False, "--eval-train", "also evaluate the (subset of the) training set each "
                               "epoch (eval mode, no augmentation)")
    skip_nonfinite: bool = setting(False, "--skip-nonfinite", "skip an optimizer step whose loss is NaN/inf "
                                   "instead of stopping")
    progress: bool = setting(True, "--no-progress", "no progress bar (there is none when stderr is not a "
                             "terminal)")
    quiet: bool = setting(False, "--quiet", "no per-epoch summary lines")
    recipe: Optional[str] = setting(None, None, "the recipe these settings came from (recorded only; `coatnet "
                                    "train --recipe NAME` applies one)")
    log: Optional[str] = setting(None, "--log", "also log to tensorboard (event files in OUT/tensorboard) or "
                                 "wandb (Weights & Biases; WANDB_MODE=offline keeps it local), or "
                                 "'tensorboard,wandb': loss, lr, img/s per step, val metrics and a few predicted "
                                 "images per epoch", metavar="TRACKER", none="none")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # clip_grad 0 (the command line's "off") is stored as None
            off, value = f.metadata["setting"].none_as, getattr(self, f.name)
            if off is not None and value == off and not isinstance(value, bool):
                object.__setattr__(self, f.name, None)

    @classmethod
    def settings(cls) -> dict[str, Setting]:
        """Field name -> its Setting, in field order, each with its --help section filled in."""
        out, section = {}, ""
        for f in dataclasses.fields(cls):
            s = f.metadata["setting"]
            section = s.section or section
            out[f.name] = dataclasses.replace(s, section=section)
        return out

    def model_overrides(self) -> dict[str, Any]:
        """The model config fields this run changes (create_model's overrides): --layout and --model-arg."""
        return {**parse_model_args(self.model_args), "layout": self.layout}

    @property
    def tta_flip_in_eval(self) -> bool:
        """Whether evaluation averages each image with its mirror (tta_flip, when training flips images)."""
        return self.tta_flip and self.augment and self.hflip > 0

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with fields changed (None sets None: clip_grad=None turns clipping off; lists become tuples);
        unknown names raise ValueError."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown training setting(s): {', '.join(unknown)}"
                             f"{did_you_mean(unknown[0], sorted(known)) if len(unknown) == 1 else ''}")
        return dataclasses.replace(self, **{k: (tuple(v) if isinstance(v, list) else v) for k, v in changes.items()})

    def check_translate(self, img_size: Optional[int]) -> None:
        """translate must leave most of the image in view: 0 <= translate < img_size / 2 (img_size None: not
        known yet, the data decides it; run_data.load_data checks again)."""
        if self.translate < 0 or (img_size is not None and self.translate >= img_size / 2):
            raise ValueError(f"translate={self.translate} must be in [0, img_size / 2) pixels"
                             f"{'' if img_size is None else f' (img_size {img_size})'}")

    def validate(self) -> "TrainConfig":
        self._check_types()

        def positive(name, allow_zero=False):
            v = getattr(self, name)
            if v is not None and (v < 0 or (v == 0 and not allow_zero)):
                raise ValueError(f"{name}={v!r} must be {'non-negative' if allow_zero else 'positive'}")

        for name in ("epochs", "batch_size", "micro_batch_size", "lr", "train_subset", "val_subset", "eval_batch_size",
                     "threads", "stop_at_step", "eval_every"):
            positive(name)
        for name in ("min_lr", "warmup_epochs", "weight_decay", "ema_decay", "mixup", "cutmix", "save_every",
                     "randaugment_n", "randaugment_m", "drop_path", "label_smoothing", "workers", "recalibrate_bn",
                     "precise_bn", "min_epoch_images"):
            positive(name, allow_zero=True)
        if not 0 < self.val_fraction < 1:  # checked before the run folder is written, as every other setting
            raise ValueError(f"val_fraction={self.val_fraction} must be in (0, 1): training needs validation images "
                             f"(a folder with train/ and val/ ignores it)")
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"layer_decay={self.layer_decay} must be in (0, 1]")
        for name in ("freeze_stages", "recalibrate_bn", "precise_bn", "min_epoch_images", "eval_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name}={v!r} must be a non-negative integer")
        if self.micro_batch_size and self.micro_batch_size > self.batch_size:
            raise ValueError(f"micro_batch_size={self.micro_batch_size} exceeds batch_size={self.batch_size}")
        for name, s in self.settings().items():
            if s.choices is not None and getattr(self, name) not in s.choices:
                raise ValueError(f"{name}={getattr(self, name)!r} must be one of {', '.join(map(repr, s.choices))}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay={self.ema_decay} must be in [0, 1)")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing={self.label_smoothing} must be in [0, 1)")
        for name in ("hflip", "random_erase"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be a probability in [0, 1]")
        self.check_translate(self.img_size)
        self.model_overrides()
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"crop_scale={self.crop_scale} must satisfy 0 < low <= high <= 1")
        positive("img_size")  # and a multiple of the model's total stride: engine.check_model, with the registry
        if self.fsdp and self.ema_decay > 0:
            raise ValueError("fsdp does not keep an EMA of sharded weights: drop ema_decay (--ema-decay) or fsdp")
        if self.data != "fashion-mnist" and data_folder_error(self.data) is not None:
            raise data_folder_error(self.data)  # before a run folder is made or a line printed
        if self.resume and not self.out:
            raise ValueError("resume needs the run folder (out)")
        if parse_log(self.log) and not self.out:
            raise ValueError(f"log={self.log!r} writes into the run folder: give one (out)")
        return self

    def _check_types(self) -> None:
        """ValueError naming the first field whose value is not of its declared type (config.json files and
        Python callers can hold anything)."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value, hint = getattr(self, f.name), hints[f.name]
            args = typing.get_args(hint)
            if typing.get_origin(hint) is typing.Union:  # Optional[X]
                if value is None:
                    continue
                hint = next(a for a in args if a is not type(None))
            if not _is_a(value, hint):
                raise ValueError(f"{f.name}={value!r} must be of type {getattr(hint, '__name__', hint)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """The settings of a config.json (a saved None is None: clip_grad None, no clipping); names this version
        does not know are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls().replace(**{k: v for k, v in d.items() if k in known})
