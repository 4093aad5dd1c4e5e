"""The three studies as data: which models, which training-set sizes, which seeds, which recipe.

Scale (chosen for a shared 2-core CPU, documented in docs/results/*.md):
- Fashion-MNIST, 28x28 grey images resized (bilinear) by the data pipeline to 32x32, 10 classes.
- Tiny models of about 0.6M parameters. The CoAtNet layouts use a stride-1 stem (`stem_stride=1`), so the
  stages S1..S4 see 16x16, 8x8, 4x4 and 2x2 maps: with the paper's stride-2 stem a 32x32 image would leave
  S3 at 2x2 and S4 at 1x1, where attention is degenerate. ViT-Rel takes 8x8 patches, i.e. a 4x4 token grid,
  the resolution of S3 here, as the paper's 16x16 patches give ViT-Rel the resolution of its S3 (1/16).
- One recipe per study (no augmentation, no label smoothing, no stochastic depth, so that the gap between
  train and val accuracy measures the architecture, not the regulariser), and the same number of
  optimizer steps per row: the smallest training set is seen for many epochs (the over-fitting,
  "generalization" regime), the full set for a fraction of one (every image new: the "capacity" regime,
  where only how fast and how well a model fits matters).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Optional

# The registered variant every study model starts from; the overrides below replace its shape.
BASE_MODEL = "coatnet_0"

# Shared by all CoAtNet-layout study models: stride-1 stem (see the module docstring), 16-channel heads.
_TINY = {"stem_stride": 1, "head_dim": 16, "depths": (1, 1, 2, 2, 1)}

# The five layouts of the paper's Sec. 3.2 / Fig. 2 at about 0.6M parameters each (within 10% of each
# other; tests/test_study.py holds them to that). Widths differ only in S4, widened where the stage
# types are cheaper in parameters (MBConv), so that parameter counts match.
LAYOUT_MODELS: dict[str, dict[str, Any]] = {
    "C-C-C-C": {**_TINY, "layout": "C-C-C-C", "widths": (16, 24, 48, 96, 240)},
    "C-C-C-T": {**_TINY, "layout": "C-C-C-T", "widths": (16, 24, 48, 96, 192)},
    "C-C-T-T": {**_TINY, "layout": "C-C-T-T", "widths": (16, 24, 48, 96, 176)},
    "C-T-T-T": {**_TINY, "layout": "C-T-T-T", "widths": (16, 24, 48, 96, 176)},
    "ViT-Rel": {"layout": "ViT-Rel", "depths": (6,), "widths": (96,), "patch_size": 8, "head_dim": 16},
}


@dataclass(frozen=True)
class Recipe:
    """Training settings shared by every row of a study (mapped onto coatnet.train.TrainConfig).

    Every row takes the same number of optimizer steps whatever its training-set size, so every row costs
    the same: a small set is seen for many epochs, a large one for a fraction of one. The learning rate is
    constant after a short warmup, so that stopping a run inside its first epoch (the engine's schedules
    span whole epochs) changes nothing about the schedule."""

    data: str = "fashion-mnist"  # dataset name understood by the training engine
    img_size: int = 32  # input side; Fashion-MNIST's 28x28 is resized to it
    steps: int = 96  # optimizer steps per row (96 x 64 = 6,144 training images)
    batch_size: int = 64  # images per optimizer step
    lr: float = 1e-3  # AdamW learning rate, constant after warmup
    warmup_steps: int = 10  # linear warmup from 0
    weight_decay: float = 0.05  # AdamW decoupled weight decay
    clip_grad: float = 1.0  # global gradient-norm clip
    label_smoothing: float = 0.0  # none: train loss is then the plain cross-entropy
    augment: bool = False  # no random augmentation: the generalization gap is the architecture's
    val_subset: Optional[int] = 5_000  # evaluate on a seeded subset of this many test images (None: all 10,000)
    train_eval_images: int = 1_000  # train loss / top-1 on a seeded sample of this many of the row's images
    threads: int = 1  # torch CPU threads (1: the machine is shared; one thread scales best under load)

    @property
    def images(self) -> int:
        return self.steps * self.batch_size

    def steps_per_epoch(self, train_size: int) -> int:
        return -(-train_size // self.batch_size)

    def epochs_for(self, train_size: int) -> int:
        """Whole epochs the engine is asked for: enough to hold `steps` (it stops there)."""
        return -(-self.steps // self.steps_per_epoch(train_size))

    def epochs_seen(self, train_size: int) -> float:
        return self.images / train_size


@dataclass(frozen=True)
class Variant:
    """One model of a study: a name (a layout or a variant label) and its config overrides."""

    name: str
    overrides: dict = field(hash=False)

    @property
    def layout(self) -> str:
        return self.overrides["layout"]


@dataclass(frozen=True)
class Study:
    """A grid of rows: every variant x every train size x the first seed, plus the further seeds at
    `repeat_sizes` (the budget allows repeats only where rows are cheap)."""

    name: str  # command name and file stem: docs/results/<name>.json / .md
    title: str
    question: str  # what the study asks, in one sentence
    paper_claims: tuple[str, ...]  # the paper's findings the study is read against
    variants: tuple[Variant, ...]
    train_sizes: tuple[int, ...]
    seeds: tuple[int, ...]
    repeat_sizes: tuple[int, ...]  # sizes run with every seed; the others with seeds[0] only
    recipe: Recipe = Recipe()
    speed_benchmark: bool = False  # also time training and inference steps of each variant side by side
    speed_rounds: int = 5  # alternating timing rounds of the speed benchmark

    def replace(self, **kw: Any) -> "Study":
        return dataclasses.replace(self, **kw)

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise ValueError(f"study {self.name!r} has no variant {name!r}; it has {', '.join(self.variant_names)}")

    @property
    def variant_names(self) -> list[str]:
        return [v.name for v in self.variants]


def run_key(overrides: dict, recipe: Recipe, train_size: int, seed: int) -> str:
    """A stable id of one training run: equal keys mean identical settings, so a row may be reused
    (between studies, or when a killed run is resumed)."""
    payload = {"base": BASE_MODEL, "model": _canonical(overrides), "recipe": dataclasses.asdict(recipe),
               "train_size": train_size, "seed": seed}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def recipe_id(recipe: Recipe) -> str:
    return hashlib.sha256(json.dumps(dataclasses.asdict(recipe), sort_keys=True).encode()).hexdigest()[:10]


def _canonical(overrides: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(overrides.items())}


# -- the studies ---------------------------------------------------------------------------------------
PAPER_FINDINGS = {
    "generalization": "generalization (train/val gap at equal train loss): "
                      "C-C-C-C ~ C-C-C-T >= C-C-T-T > C-T-T-T >> ViT-Rel",
    "capacity": "capacity (fit on large data): C-C-T-T ~ C-T-T-T > ViT-Rel > C-C-C-T > C-C-C-C",
    "attention": "relative attention generalizes better than standard attention "
                 "(84.1 vs 83.8 on ImageNet-1K for CoAtNet-2-size)",
    "norms": "BatchNorm vs LayerNorm in blocks: similar accuracy; BatchNorm faster",
}

_CCTT = LAYOUT_MODELS["C-C-T-T"]

STUDIES: dict[str, Study] = {
    "layouts": Study(
        name="layouts",
        title="Layouts: C-C-C-C, C-C-C-T, C-C-T-T, C-T-T-T and ViT-Rel across training-set sizes",
        question="Which stage layout generalizes best from little data, and which fits large data best?",
        paper_claims=(PAPER_FINDINGS["generalization"], PAPER_FINDINGS["capacity"]),
        variants=tuple(Variant(name, overrides) for name, overrides in LAYOUT_MODELS.items()),
        train_sizes=(1_000, 4_000, 60_000),
        seeds=(0, 1),
        repeat_sizes=(1_000, 4_000, 60_000),
    ),
    "attention": Study(
        name="attention",
        title="Attention: relative (pre-softmax), relative (post-softmax) and standard attention in C-C-T-T",
        question="Does the pre-softmax relative bias generalize better than standard attention?",
        paper_claims=(PAPER_FINDINGS["attention"],),
        variants=(Variant("relative", {**_CCTT, "attention_bias": "relative"}),
                  Variant("relative_post", {**_CCTT, "attention_bias": "relative_post"}),
                  Variant("none", {**_CCTT, "attention_bias": "none"})),
        train_sizes=(1_000, 60_000),
        seeds=(0, 1),
        repeat_sizes=(1_000, 60_000),
    ),
    "norms": Study(
        name="norms",
        title="Norms: LayerNorm against BatchNorm in the Transformer blocks of C-C-T-T",
        question="Does BatchNorm in the Transformer blocks match LayerNorm's accuracy, and is it faster?",
        paper_claims=(PAPER_FINDINGS["norms"],),
        variants=(Variant("layernorm", {**_CCTT, "norm": "layernorm"}),
                  Variant("batchnorm", {**_CCTT, "norm": "batchnorm"})),
        train_sizes=(1_000, 60_000),
        seeds=(0, 1),
        repeat_sizes=(1_000, 60_000),
        speed_benchmark=True,
    ),
}

# --quick: the same models and recipe shape at a size that runs in about a minute per study (for tests
# and smoke checks); its rows are not results.
QUICK_RECIPE = Recipe(steps=4, batch_size=32, warmup_steps=1, val_subset=200, train_eval_images=100)
QUICK_SIZES = (64, 256)


def get_study(name: str, quick: bool = False) -> Study:
    if name not in STUDIES:
        raise ValueError(f"unknown study {name!r}; available: {', '.join(STUDIES)}")
    study = STUDIES[name]
    if quick:
        study = study.replace(train_sizes=QUICK_SIZES, seeds=(0,), repeat_sizes=(), recipe=QUICK_RECIPE,
                              speed_rounds=1)
    return study
