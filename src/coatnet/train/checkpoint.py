"""Checkpoints as safetensors + JSON metadata, written atomically (temporary file, fsync, rename).

A run folder holds, per checkpoint name ("last", "best"):
- checkpoint-<name>.safetensors: the weights evaluation uses (the EMA when enabled), with metadata
  "coatnet" = JSON {model_config, data (DataSpec: classes, size, normalisation), epoch, step, metrics}.
  Enough for `coatnet eval` and `coatnet predict`.
- checkpoint-last.state.safetensors: everything to resume: the raw weights ("model.*"), EMA ("ema.*"),
  optimizer tensors ("optim.<param>.<name>"), and metadata "state" = JSON {optimizer scalars, progress
  (TrainState.to_dict, train/state.py)}.
  It alone resumes a run, so a crash between writing the two files cannot pair mismatched halves.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..data import DataSpec
from ..models import CoAtNet, CoAtNetConfig
from ..models.weights import exported_kind, not_weights_error, upgrade_state_dict
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


def _not_safetensors(path: Path, error: Exception) -> ValueError:
    """The error for a file safetensors cannot parse, saying what it looks like instead."""
    with open(path, "rb") as f:
        head = f.read(8)
    if not head:
        return ValueError(f"{path} is empty, not a checkpoint")
    kind = exported_kind(path)
    if kind is not None:
        return not_weights_error(path, kind)
    if head[:1] == b"\x80" or head[:2] == b"PK":  # a pickle, or PyTorch's zip of pickles
        return ValueError(f"{path} is a pickle (PyTorch .pth/.pt/.bin), not a safetensors checkpoint; refusing to "
                          f"unpickle it (that can run code). Plain weights of that kind load with "
                          f"coatnet.create_model(name, pretrained=...)")
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ValueError(f"{path} is not a valid safetensors file ({reason})")


def _open_metadata(path: str | os.PathLike, what: str) -> tuple[Path, dict]:
    """(path, safetensors metadata) of an existing checkpoint file; clear errors for anything else."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a folder, not a file"
                                + (f" (its checkpoints: {path / 'checkpoint-best.safetensors'}, ...)"
                                   if weights_path(path, "best").is_file() else ""))
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return path, f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for malformed headers
        raise _not_safetensors(path, e) from None


def checkpoint_info(path: str | os.PathLike) -> dict | None:
    """The JSON info (model_config, data, epoch, step, metrics, run) of one of our checkpoint-*.safetensors
    files, without reading its tensors; None for a safetensors file without it (timm's weights, plain
    weights). A file that is missing, a folder, or not safetensors raises (FileNotFoundError,
    IsADirectoryError, ValueError naming what it is)."""
    path, meta = _open_metadata(path, "checkpoint")
    if meta.get("format") != FORMAT or "coatnet" not in meta:
        return None
    try:
        return json.loads(meta["coatnet"])
    except ValueError:
        raise ValueError(f"{path}: its metadata is not valid JSON (damaged file?)") from None


def read_checkpoint_info(path: str | os.PathLike) -> dict:
    """`checkpoint_info` of a file that must be one of our checkpoints (ValueError otherwise)."""
    info = checkpoint_info(path)
    if info is None:
        raise ValueError(f"{path} is not a coatnet training checkpoint (no model config in its metadata)")
    return info


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(weights, info) of a checkpoint-*.safetensors file."""
    info = read_checkpoint_info(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ValueError(f"{path}: its tensors cannot be read ({e}); the file is damaged") from None
    return upgrade_state_dict(tensors), info


def save_train_state(path: str | os.PathLike, model_state: dict, ema_state: dict | None,
                     optimizer: torch.optim.Optimizer | dict, progress: dict) -> None:
    """Everything needed to resume, in one safetensors file (no pickle). `optimizer` may also be given as
    its state dict (whole tensors gathered from sharded processes)."""
    tensors = {f"model.{k}": v for k, v in model_state.items()}
    if ema_state is not None:
        tensors.update({f"ema.{k}": v for k, v in ema_state.items()})
    opt = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
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


def read_progress(path: str | os.PathLike) -> dict:
    """The progress (epoch, step_in_epoch, global_step, ...) recorded in a checkpoint-last.state file."""
    path, meta = _open_metadata(path, "training state")
    try:
        return json.loads(meta["state"])["progress"]
    except (KeyError, ValueError, TypeError):
        raise ValueError(f"{path} is not a coatnet training state (no progress in its metadata)") from None


def load_train_state(path: str | os.PathLike) -> dict:
    """{"model": state dict, "ema": state dict or None, "optimizer": optimizer state dict, "progress": dict}."""
    try:
        read_progress(path)
    except ValueError as e:
        what = str(e).removeprefix(f"{path} is ").removeprefix(f"{path} ")
        raise ValueError(f"cannot resume from {path}: {what}; move it away to start the run over") from None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ValueError(f"cannot resume from {path}: the file is damaged ({e}); move it away to start over"
                         ) from None
    model = upgrade_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    ema = upgrade_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}) or None
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    for pid, values in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(values)
    return {"model": model, "ema": ema, "optimizer": {"state": state, "param_groups": meta["param_groups"]},
            "progress": meta["progress"]}


def checkpoint_file(path: str | os.PathLike) -> Path:
    """`path`, or the model.safetensors in it when it is a Hub-format folder (`coatnet save-pretrained`)."""
    path = Path(path)
    return path / "model.safetensors" if path.is_dir() and (path / "model.safetensors").is_file() else path


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """(model in eval mode, DataSpec, info) from a checkpoint-*.safetensors file (or a Hub-format folder);
    no other flags needed."""
    path = checkpoint_file(path)
    tensors, info = read_checkpoint(path)
    try:
        config, spec = CoAtNetConfig.from_dict(info["model_config"]), DataSpec.from_dict(info["data"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: the model config or data spec in its metadata is invalid ({e})") from None
    # The shapes the config implies, from a model built on the meta device (no memory): a file whose
    # metadata claims a network its tensors do not hold is refused before anything is allocated for it.
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in CoAtNet(config).state_dict().items()}
    if expected != {k: tuple(v.shape) for k, v in tensors.items()}:
        differ = (sorted(set(expected) ^ set(tensors))
                  or sorted(k for k in expected if expected[k] != tuple(tensors[k].shape)))
        raise ValueError(f"{path}: weights do not match the model config in its metadata (e.g. {differ[0]})")
    model = CoAtNet(config)
    model.load_state_dict(tensors)
    return model.to(device).eval(), spec, info
