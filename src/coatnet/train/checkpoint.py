"""Checkpoints as safetensors + JSON metadata, written atomically (temporary file, fsync, rename).

A run folder holds, per checkpoint name ("last", "best"):
- checkpoint-<name>.safetensors: the weights evaluation uses (the EMA when enabled), with metadata
  "coatnet" = JSON {model_config, data (DataSpec: classes, size, normalisation), epoch, step, metrics}.
  Enough for `coatnet eval` and `coatnet predict`.
- checkpoint-last.state.safetensors: everything to resume: the raw weights ("model.*"), EMA ("ema.*"),
  optimizer tensors ("optim.<param>.<name>"), and metadata "state" = JSON {optimizer scalars, progress}.
  It alone resumes a run, so a crash between writing the two files cannot pair mismatched halves.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..utils import atomic_write

FORMAT = "coatnet-checkpoint-v1"


def weights_path(run_dir: str | os.PathLike, name: str) -> Path:
    return Path(run_dir) / f"checkpoint-{name}.safetensors"


def state_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoint-last.state.safetensors"


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_weights_checkpoint(path: str | os.PathLike, weights: dict[str, torch.Tensor], info: dict) -> None:
    """Weights plus `info` (model_config, data, epoch, ...) as JSON metadata, atomically."""
    meta = {"format": FORMAT, "coatnet": json.dumps(info)}
    with atomic_write(path) as tmp:
        save_file(_cpu(weights), str(tmp), metadata=meta)


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(weights, info) of a checkpoint-*.safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ValueError(f"{path} is not a valid safetensors file ({e})") from None
    if meta.get("format") != FORMAT or "coatnet" not in meta:
        raise ValueError(f"{path} is not a coatnet training checkpoint (no model config in its metadata)")
    return tensors, json.loads(meta["coatnet"])


def save_train_state(path: str | os.PathLike, model_state: dict, ema_state: dict | None,
                     optimizer: torch.optim.Optimizer, progress: dict) -> None:
    """Everything needed to resume, in one safetensors file (no pickle)."""
    tensors = {f"model.{k}": v for k, v in model_state.items()}
    if ema_state is not None:
        tensors.update({f"ema.{k}": v for k, v in ema_state.items()})
    opt = optimizer.state_dict()
    scalars: dict[str, dict] = {}
    for pid, st in opt["state"].items():
        for name, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{pid}.{name}"] = value
            else:
                scalars.setdefault(str(pid), {})[name] = value
    meta_state = {"param_groups": opt["param_groups"], "scalars": scalars, "progress": progress}
    with atomic_write(path) as tmp:
        save_file(_cpu(tensors), str(tmp), metadata={"format": FORMAT, "state": json.dumps(meta_state)})


def load_train_state(path: str | os.PathLike) -> dict:
    """{"model": state dict, "ema": state dict or None, "optimizer": optimizer state dict, "progress": dict}."""
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {})["state"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    model = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")} or None
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    for pid, values in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(values)
    return {"model": model, "ema": ema, "optimizer": {"state": state, "param_groups": meta["param_groups"]},
            "progress": meta["progress"]}


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """(model in eval mode, DataSpec, info) from a checkpoint-*.safetensors file; no other flags needed."""
    from ..data import DataSpec
    from ..models import CoAtNet, CoAtNetConfig

    tensors, info = read_checkpoint(path)
    model = CoAtNet(CoAtNetConfig.from_dict(info["model_config"]))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the model config in its metadata "
                         f"({len(missing)} missing, {len(unexpected)} unexpected keys)")
    return model.to(device).eval(), DataSpec.from_dict(info["data"]), info
