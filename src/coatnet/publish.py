"""Publishing a trained model: Hub-format folders (`coatnet save-pretrained`) and uploading them (`coatnet push`).

`save_pretrained(checkpoint, folder)` writes config.json, model.safetensors (the checkpoint's weights and
metadata) and a generated README.md model card: architecture, parameters and multiply-adds, the data,
per-epoch metrics from the run's metrics.jsonl, its curves, the command that trained it, the licence.
The run folder next to the checkpoint (config.json, metrics.jsonl, curves.png) supplies what the
checkpoint alone does not. `coatnet.create_model(pretrained=folder)` and, once pushed,
`pretrained="hf-hub:user/name"` load it (models/hub.py).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
from pathlib import Path

from .models import count_macs, count_params
from .models.flops import build_on_meta
from .models.hub import HUB_FILES, HUB_FORMAT, is_ours, read_hub_config
from .train.checkpoint import load_model, read_checkpoint, save_weights_checkpoint
from .train.config import TrainConfig
from .train.recipes import FINETUNE_RECIPE
from .train.metrics import read_metrics
from .train.recipes import RECIPES
from .utils import atomic_write, read_json_object
from .version import __version__

log = logging.getLogger(__name__)

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
# The settings that only say how fast or how loudly a run went: left out of the reconstructed command.
_NOT_IN_COMMAND = {"progress", "quiet", "resume", "recipe", "pretrained", "eval_before"}


def save_pretrained(checkpoint: str | os.PathLike, folder: str | os.PathLike, license: str = "apache-2.0",
                    repo_id: str | None = None) -> Path:
    """Write `checkpoint` (a checkpoint-*.safetensors of ours) as a Hub-format folder; returns the folder.
    `repo_id` ("user/name") only fills the card's usage lines. A folder that holds anything but an earlier
    Hub folder of ours is refused (nothing is overwritten by accident)."""
    checkpoint, folder = Path(checkpoint), Path(folder)
    if repo_id is not None and not REPO_ID.match(repo_id):
        raise ValueError(f"repo id {repo_id!r} must look like 'user/name'")
    tensors, info = read_checkpoint(checkpoint)
    model, spec, _ = load_model(checkpoint)  # checks the weights against the config they claim
    if folder.exists() and (not folder.is_dir() or (any(folder.iterdir()) and not is_ours(read_hub_config(folder)))):
        raise FileExistsError(f"{folder} exists and is not a Hub folder of ours: pass a new or empty folder")
    folder.mkdir(parents=True, exist_ok=True)
    run_dir = checkpoint.parent
    run = _read_json(run_dir / "config.json")
    metrics = _read_metrics(run_dir / "metrics.jsonl")
    arch = (info.get("run") or {}).get("model") or run.get("model")
    config = {"library_name": "coatnet", "format": HUB_FORMAT, "coatnet_version": __version__, "architecture": arch,
              "num_classes": model.num_classes, "in_chans": model.in_chans, "img_size": list(model.config.image_size),
              "label_names": list(spec.classes), "model_config": model.config.to_dict(), "data": spec.to_dict(),
              # the exact eval transform (docs/interop.md; coatnet.data.eval_transform applies it)
              "preprocessing": spec.preprocessing(tta_flip=bool((info.get("run") or {}).get("tta_flip"))),
              # timm's names for the preprocessing, for tools that read timm's config.json
              "pretrained_cfg": {"input_size": [spec.in_chans, spec.img_size, spec.img_size], "mean": list(spec.mean),
                                 "std": list(spec.std), "crop_pct": spec.crop_fraction, "interpolation": "bilinear"},
              "epoch": info.get("epoch"), "step": info.get("step"), "metrics": info.get("metrics") or {}}
    save_weights_checkpoint(folder / "model.safetensors", tensors, info)
    _write_text(folder / "config.json", json.dumps(config, indent=2) + "\n")
    has_curves = (run_dir / "curves.png").is_file()
    if has_curves:
        with atomic_write(folder / "curves.png") as tmp:
            shutil.copyfile(run_dir / "curves.png", tmp)
    elif (folder / "curves.png").exists():  # an earlier save's, of another run
        (folder / "curves.png").unlink()
    card = model_card(model, config, info, run, metrics, has_curves, license, repo_id or f"<user>/{folder.name}")
    _write_text(folder / "README.md", card)
    log.info("wrote %s (config.json, model.safetensors, README.md%s)", folder, ", curves.png" if has_curves else "")
    return folder


def push_to_hub(folder: str | os.PathLike, repo_id: str, token: str | None = None, private: bool = False,
                commit_message: str = "Upload coatnet model") -> str:
    """Upload a Hub-format folder to the Hugging Face Hub repo `repo_id` (created if missing) with
    huggingface_hub; returns the repo's URL. One-line ValueErrors: no huggingface_hub, not a Hub folder,
    offline, not logged in, refused."""
    folder = Path(folder)
    if not REPO_ID.match(repo_id):
        raise ValueError(f"--repo {repo_id!r} must look like 'user/name'")
    if not is_ours(read_hub_config(folder)) or not (folder / "model.safetensors").is_file():
        raise ValueError(f"{folder} is not a Hub folder of ours (config.json and model.safetensors, written by "
                         f"`coatnet save-pretrained`)")
    try:
        from huggingface_hub import HfApi
        from huggingface_hub.utils import logging as hub_logging
    except ImportError:
        raise ValueError("pushing needs huggingface_hub: pip install 'coatnet[hub]'") from None
    hub_logging.set_verbosity_error()
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=commit_message,
                          allow_patterns=list(HUB_FILES))
    except Exception as e:  # offline, no token, no permission: one line
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"could not push {folder} to the Hugging Face Hub repo {repo_id}: {detail}") from None
    return f"https://huggingface.co/{repo_id}"


# -- the model card ------------------------------------------------------------------------------------------
def model_card(model, config: dict, info: dict, run: dict, metrics: list[dict], has_curves: bool, license: str,
               repo_id: str) -> str:
    """README.md of a Hub folder: YAML front matter (licence, library, tags, results) and the sections."""
    cfg = model.config
    spec = config["data"]
    arch = config["architecture"] or "coatnet"
    params = count_params(model)
    macs = count_macs(build_on_meta(cfg))
    fashion = spec["name"] == "fashion-mnist"
    dataset = "Fashion-MNIST" if fashion else Path(spec["name"]).name
    last = metrics[-1] if metrics else (info.get("metrics") or {})
    scored = [r for r in metrics if "val_top1" in r]  # --eval-every leaves epochs without validation scores
    best = max(scored, key=lambda r: r["val_top1"]) if scored else None
    own = info.get("metrics") or {}
    size = "x".join(map(str, cfg.image_size))
    lines = ["---", f"license: {license}", "library_name: coatnet", "pipeline_tag: image-classification",
             "tags:", "- image-classification", "- coatnet", "- pytorch", "- safetensors"]
    if fashion:
        lines += ["datasets:", "- zalando-datasets/fashion_mnist"]
    if own.get("val_top1") is not None:
        lines += ["metrics:", "- accuracy", "model-index:", f"- name: {json.dumps(repo_id.split('/')[-1])}",
                  "  results:", "  - task:", "      type: image-classification", "    dataset:",
                  f"      name: {json.dumps(dataset)}",
                  f"      type: {json.dumps('fashion_mnist' if fashion else dataset)}",
                  "      split: test" if fashion else "      split: validation", "    metrics:",
                  "    - type: accuracy", f"      value: {own['val_top1']:.2f}", "      name: top-1 accuracy (%)"]
    lines += ["---", "", f"# {repo_id.split('/')[-1]}: CoAtNet ({arch}) on {dataset}", ""]
    lines += [f"A CoAtNet image classifier (Dai, Liu, Le, Tan, \"CoAtNet: Marrying Convolution and Attention for "
              f"All Data Sizes\", 2021) trained with [coatnet](https://pypi.org/project/coatnet/): "
              f"{len(spec['classes'])} classes, {spec['in_chans']}-channel {size} inputs, "
              f"{params / 1e6:.2f}M parameters.", ""]
    lines += ["## Use", "", "```python", "import coatnet", "",
              f'model = coatnet.create_model(pretrained="hf-hub:{repo_id}").eval()   # or a local copy of this folder',
              "```", "", "```bash",
              "coatnet predict --checkpoint model.safetensors IMAGE_OR_FOLDER... --output preds.csv",
              "```", ""]
    lines += ["## Architecture", "", "| | |", "|---|---|", f"| model | `{arch}` |", f"| layout (S1-S4) | {cfg.layout} "
              f"(C: MBConv, T: Transformer with relative attention) |",
              f"| depths S0-S4 | {', '.join(map(str, cfg.depths))} |",
              f"| widths S0-S4 | {', '.join(map(str, cfg.widths))} |",
              f"| attention head size | {cfg.transformer.head_dim} |",
              f"| norm in Transformer blocks | {cfg.transformer.norm} |", f"| parameters | {params:,} |",
              f"| multiply-adds per image at {size} | {macs / 1e6:,.1f} M |", "",
              "`config.json` holds the full configuration (`model_config`); any input whose sides are multiples of 32 "
              "works (relative-position tables are resized).", ""]
    lines += ["## Data and preprocessing", "", f"- data: {dataset}" + (
        " (60,000 training and 10,000 test images of 10 garment classes, 28x28 grayscale; the test images are the "
        "validation set)" if fashion else f" (image folder `{spec['name']}`)")]
    if run.get("train_images"):
        lines.append(f"- images used: {run['train_images']:,} for training, "
                     f"{run.get('val_images', 0):,} for validation")
    lines += [f"- classes: {', '.join(spec['classes'])}",
              f"- input: resize and centre-crop (fraction {spec['crop_fraction']}) to "
              f"{spec['img_size']}x{spec['img_size']},"
              f" scale to [0, 1], normalise with mean {tuple(spec['mean'])}, std {tuple(spec['std'])}", ""]
    lines += ["## Metrics", ""]
    if own.get("val_top1") is not None:
        lines += [f"These weights: epoch {info.get('epoch')}, step {info.get('step')}: validation top-1 "
                  f"{own['val_top1']:.2f}%, top-5 {own.get('val_top5', float('nan')):.2f}%, loss "
                  f"{own.get('val_loss', float('nan')):.4f}." + (f" Best epoch of the run: {best['epoch']} "
                                                                   f"({best['val_top1']:.2f}%)." if best else ""), ""]
    if metrics:
        lines += ["| epoch | train loss | train top-1 (%) | val loss | val top-1 (%) | val top-5 (%) | lr | img/s |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in metrics:
            val = (f"{r['val_loss']:.4f} | {r['val_top1']:.2f} | {r['val_top5']:.2f}" if "val_top1" in r
                   else "not evaluated | | ")
            lines.append(f"| {r['epoch']} | {r['train_loss']:.4f} | {r['train_top1']:.2f} | {val} | {r['lr']:.2e} | "
                         f"{r.get('img_per_s', 0):.0f} |")
        lines.append("")
        final = f" Final epoch: {last['val_top1']:.2f}% top-1." if "val_top1" in last else ""
        lines.append("Train loss and top-1 are running values over each epoch, with augmentation; validation is "
                     "in eval mode." + final)
        lines.append("")
    else:
        lines += ["No metrics.jsonl was found next to the checkpoint: per-epoch metrics are not available.", ""]
    if has_curves:
        lines += ["![loss and top-1 per epoch](curves.png)", ""]
    lines += ["## Training", ""]
    if run:
        lines += ["```bash", train_command(run), "```", "",
                  f"{run.get('epochs')} epochs, batch {run.get('batch_size')}, AdamW peak lr {run.get('lr')} "
                  f"({run.get('schedule')} decay, {run.get('warmup_epochs')} warmup epochs), weight decay "
                  f"{run.get('weight_decay')}, seed {run.get('seed')}; {run.get('steps_per_epoch')} steps per epoch on "
                  f"{run.get('world_size', 1)} process(es). Every setting is in the run's config.json.", ""]
    else:
        lines += ["The run folder's config.json was not next to the checkpoint: the training command is not known.", ""]
    lines += ["## Licence", "", f"The weights are released under `{license}`"
              + (" (the licence of the code, coatnet, is Apache-2.0)." if license != "apache-2.0" else
                 ", the licence of the coatnet code.")]
    if fashion:
        lines.append("Fashion-MNIST (Xiao, Rasul, Vollgraf 2017, Zalando Research) is distributed under the "
                     "MIT licence.")
    else:
        lines.append("The terms of the training images are those of their owners.")
    if run.get("pretrained"):
        lines.append(f"Fine-tuned from `{run['pretrained']}`: the terms of those weights apply as well.")
    lines += ["", "## Limitations", "",
              f"A classifier of exactly these {len(spec['classes'])} classes; images unlike its training data (other "
              "content, colours, sizes or framing) get confident but meaningless answers. The metrics above are "
              "those of the training run, measured on its validation images.", ""]
    return "\n".join(lines)


def train_command(run: dict) -> str:
    """The command that reproduces a run from its config.json: its recipe (or `coatnet finetune` from its
    starting weights) and a flag for every setting that differs from what that command alone would use."""
    settings = TrainConfig.from_dict(run)
    if run.get("recipe") == "finetune" and run.get("pretrained"):
        words = ["coatnet", "finetune", "--checkpoint", str(run["pretrained"])]
        base = TrainConfig().replace(**FINETUNE_RECIPE, model=settings.model, pretrained=settings.pretrained,
                                     eval_before=True, recipe="finetune", layout=settings.layout,
                                     model_args=settings.model_args)
    else:
        recipe = run.get("recipe") if run.get("recipe") in RECIPES else None
        words = ["coatnet", "train"] + (["--recipe", recipe] if recipe and recipe != "default" else [])
        base = TrainConfig().replace(**(RECIPES[recipe]() if recipe else {}))
    spelled = set()
    for name, value in settings.to_dict().items():
        if name in _NOT_IN_COMMAND or value == getattr(base, name):
            continue
        words += _flag_words(settings, name, spelled)
    return " ".join(shlex.quote(w) for w in words)


def _flag_words(cfg: TrainConfig, name: str, spelled: set) -> list[str]:
    """The command-line words that set TrainConfig field `name` to its value in `cfg` (the flags in the field's
    Setting); [] for a field without a flag, or a value its flag cannot give. `spelled`: the flags already
    written (a flag that sets several fields, --randaugment N M, is written once)."""
    settings = TrainConfig.settings()
    s, value = settings[name], getattr(cfg, name)
    if not s.flags or s.flags in spelled:
        return []
    spelled.add(s.flags)
    joint = [f for f, t in settings.items() if t.flags == s.flags]
    if len(joint) > 1:
        return [s.flags[0], *(str(getattr(cfg, f)) for f in joint)]
    if isinstance(value, bool):  # "--x" sets True, "--no-x" False
        return [f for f in s.flags if f.startswith("--no-") != value][:1]
    if value is None:
        return [s.flags[0], f"{s.none_as:g}"] if s.none_as is not None else []
    if isinstance(value, (tuple, list)):
        return [s.flags[0], *map(str, value)]
    return [s.flags[0], str(value)]


def _read_json(path: Path) -> dict:
    """The run's config.json, or {} when it is missing or unreadable (the card then says so)."""
    try:
        return read_json_object(path)
    except (OSError, ValueError):
        return {}


def _read_metrics(path: Path) -> list[dict]:
    try:
        return read_metrics(path)
    except (OSError, ValueError):
        return []


def _write_text(path: Path, text: str) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(text)
