"""Hugging Face Hub-format model folders: reading them back (`create_model(pretrained=DIR or "hf-hub:user/name")`).

A folder written by `coatnet save-pretrained` (coatnet.hub.save_pretrained) holds:
- config.json: {"library_name": "coatnet", "format": HUB_FORMAT, "architecture": registered name,
  "model_config": CoAtNetConfig.to_dict(), "data": DataSpec.to_dict() (classes, in_chans, img_size,
  crop_fraction, mean, std), ...};
- model.safetensors: the weights, with a training checkpoint's metadata, so every command that takes
  `--checkpoint FILE` takes DIR/model.safetensors too;
- README.md: the model card.
"hf-hub:user/name" is looked up in the Hugging Face cache ($HF_HUB_CACHE, as huggingface_hub keeps it) and,
where the optional huggingface_hub is installed and the network allows, downloaded into it. A repo whose
config.json is not ours but names one of our registered (timm) architectures loads as timm's weights.
"""
from __future__ import annotations

import os
from pathlib import Path


from ..utils import read_json_object
from .coatnet import CoAtNet
from .config import CoAtNetConfig
from .pretrained import WEIGHTS, _strip_hub_prefix, hf_cache_dir, hf_cache_snapshots
from .weights import load_state, read_weights

HUB_FORMAT = "coatnet-hub-v1"
HUB_PREFIX = "hf-hub:"
HUB_FILES = ("config.json", "model.safetensors", "README.md", "curves.png")


def is_hub_id(pretrained) -> bool:
    """Whether `pretrained` names a Hub repo ("hf-hub:user/name") that is not one of timm's published tags."""
    return (isinstance(pretrained, str) and pretrained.startswith(HUB_PREFIX)
            and _strip_hub_prefix(pretrained) not in WEIGHTS and "/" in pretrained[len(HUB_PREFIX):])


def read_hub_config(folder: str | os.PathLike) -> dict | None:
    """The config.json of a Hub-format folder (ours or timm's); None when `folder` has none."""
    path = Path(folder) / "config.json"
    return read_json_object(path) if path.is_file() else None


def is_ours(config: dict | None) -> bool:
    return isinstance(config, dict) and config.get("format") == HUB_FORMAT


def hub_snapshot(repo_id: str) -> Path:
    """A local folder with repo `repo_id`'s files: the Hugging Face cache's snapshot (no network), else a
    download with huggingface_hub into that cache. One-line errors when neither works."""
    for snapshot in hf_cache_snapshots(repo_id):
        if (snapshot / "config.json").is_file():
            return snapshot
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import logging as hub_logging
    except ImportError:
        raise FileNotFoundError(f"{HUB_PREFIX}{repo_id} is not in the Hugging Face cache {hf_cache_dir()}, and "
                                f"downloading it needs huggingface_hub: pip install 'coatnet[hub]'") from None
    hub_logging.set_verbosity_error()  # its retry warnings would bury the one-line error below
    try:
        return Path(snapshot_download(repo_id, allow_patterns=list(HUB_FILES) + ["pytorch_model.bin"]))
    except Exception as e:  # offline, no such repo, no access: one line, not a traceback
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(f"{HUB_PREFIX}{repo_id} is not in the Hugging Face cache {hf_cache_dir()} and could "
                                f"not be downloaded: {detail}") from None


def resolve_hub_folder(pretrained) -> Path | None:
    """The local folder that `pretrained` names when it is a Hub-format folder or "hf-hub:user/name"; None
    for anything else (a file, a published tag)."""
    if is_hub_id(pretrained):
        return hub_snapshot(pretrained[len(HUB_PREFIX):].split("@")[0])
    if isinstance(pretrained, (str, os.PathLike)) and Path(pretrained).is_dir():
        if not (Path(pretrained) / "config.json").is_file():
            raise FileNotFoundError(f"{pretrained} is a folder without config.json: not a Hub-format model folder "
                                    f"(write one with `coatnet save-pretrained`)")
        return Path(pretrained)
    return None


def hub_weights_file(folder: Path) -> Path:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder} holds no model.safetensors")


def timm_folder_model(folder: Path, config: dict | None, name: str | None, overrides: dict) -> tuple[str, dict]:
    """(architecture, overrides) to build a timm Hub folder's network with: its config.json names the
    architecture and the class count, unless overridden."""
    arch = (config or {}).get("architecture")
    if not isinstance(arch, str):
        raise ValueError(f"{folder}/config.json is neither a coatnet model folder nor names a timm architecture")
    if name is not None and name != arch:
        raise ValueError(f"{folder} holds {arch}, not {name}")
    overrides = dict(overrides)
    if overrides.get("num_classes") is None and isinstance(config.get("num_classes"), int):
        overrides["num_classes"] = config["num_classes"]
    return arch, overrides


def load_hub_model(folder: Path, config: dict, name: str | None, overrides: dict) -> CoAtNet:
    """A CoAtNet from one of our Hub-format folders (`config`: its config.json): the exact network (with its
    class count, input channels and size), changed by `overrides`."""
    arch = config.get("architecture")
    if name is not None and name != arch:
        raise ValueError(f"{folder} holds {arch}, not {name} (leave the name out to build what it holds)")
    try:
        base = CoAtNetConfig.from_dict(config["model_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{folder}/config.json: its model_config is invalid ({e})") from None
    model = CoAtNet(base.replace(**overrides).validate())
    path = hub_weights_file(folder)
    load_state(model, read_weights(path), path)  # the stem is adapted to other input channels
    # What predicting needs beside the weights, under timm's attribute name: the class names (label_names) and
    # the exact eval transform ("preprocessing": coatnet.data.eval_transform(model.pretrained_cfg["preprocessing"])).
    model.pretrained_cfg = {**(config.get("pretrained_cfg") or {}), "label_names": config.get("label_names"),
                            "preprocessing": config.get("preprocessing")}
    return model
