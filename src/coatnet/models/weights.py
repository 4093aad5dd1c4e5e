"""Loading and saving model weights as safetensors (never pickle)."""
from __future__ import annotations

import argparse
import logging
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..utils import atomic_write
from .timm_import import convert_timm_state_dict, is_timm_state_dict

log = logging.getLogger(__name__)

def save_weights(model: nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write the model's state dict to `path` atomically (temporary file, fsync, rename)."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_write(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)


def exported_kind(path: str | os.PathLike) -> str | None:
    """"TorchScript" or "ONNX" for a file written by `coatnet export` (a program, not weights), else None."""
    path = Path(path)
    if path.suffix == ".onnx":
        return "ONNX"
    try:
        with zipfile.ZipFile(path) as z:  # TorchScript: PyTorch's zip format with the program's code/ inside
            return "TorchScript" if any("/code/" in n for n in z.namelist()) else None
    except (zipfile.BadZipFile, OSError):
        return None


def not_weights_error(path: str | os.PathLike, kind: str) -> ValueError:
    """The error for an exported file passed where weights or a checkpoint are read."""
    run, article = ("torch.jit.load", "a") if kind == "TorchScript" else ("onnxruntime", "an")
    return ValueError(f"{path} is {article} {kind} export (`coatnet export`), a program for {run}, not weights: pass "
                      f"the .safetensors checkpoint it was exported from (its metadata names it: source_checkpoint)")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file, or from a .pth/.bin read with torch.load(weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for malformed headers
            raise ValueError(f"{path} is not a valid safetensors file ({e})") from None
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty, not a weights file")
    kind = exported_kind(path)
    if kind is not None:
        raise not_weights_error(path, kind)
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols; the error below says enough
            warnings.simplefilter("ignore")
            # timm's train.py stores its argparse.Namespace beside the weights: plain data, allowed.
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        text = str(e)
        if isinstance(e, pickle.UnpicklingError) or "Weights only load failed" in text:
            calls = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
            what = f" (it calls {calls.group(1)})" if calls else ""
            raise ValueError(f"{path} holds more than plain tensors{what}: refusing to unpickle it (that can run "
                             f"code); nothing in it was run") from None
        reason = text.strip().splitlines()[0] if text.strip() else type(e).__name__
        raise ValueError(f"{path} is neither a safetensors file nor PyTorch weights ({reason})") from None
    for key in ("state_dict", "model", "state_dict_ema", "model_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    if obj and all(k.startswith("module.") for k in obj):  # saved from a DistributedDataParallel wrapper
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    return obj


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model weights in a file (see read_state_dict), in the file's own naming (ours or timm's)."""
    state = read_state_dict(path)
    if any(k.startswith("model.") for k in state):
        # Weights stored under "model." beside other tensors (such as a parity fixture's inputs and
        # outputs): the weights are the "model." entries.
        others = sorted(k for k in state if not k.startswith("model."))
        if others:
            log.info(f"note: {path}: reading the model.* entries; ignoring {len(others)} others "
                     f"({', '.join(others[:5])})")
        state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    return state


# Our own keys that changed, old -> new (re patterns on whole keys): before 0.1.0's position-bias plug-in
# slot, the attention held its table and MLP itself.
_OLD_KEYS = [
    (r"(^|\.)relative_bias_table$", r"\1position_bias.relative_bias_table"),
    (r"(^|\.)relative_position_mlp\.", r"\1position_bias."),
]


def upgrade_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict of ours with the keys of earlier versions renamed to the current ones (`_OLD_KEYS`);
    current keys pass unchanged."""
    def upgrade(key: str) -> str:
        if ".position_bias." in key or key.startswith("position_bias."):
            return key
        for pattern, new in _OLD_KEYS:
            key = re.sub(pattern, new, key)
        return key

    return {upgrade(k): v for k, v in state.items()}


def checkpoint_num_classes(state: dict[str, torch.Tensor]) -> int | None:
    """The class count of the classifier in a state dict (ours or timm's); None when it has none."""
    for key in ("head.weight", "head.fc.weight"):
        if key in state and state[key].ndim in (2, 4):
            return int(state[key].shape[0])
    return None


def checkpoint_in_chans(state: dict[str, torch.Tensor]) -> int | None:
    """The input channels of the stem's first convolution in a state dict (ours or timm's); None if unknown."""
    for key in ("stem.layers.0.weight", "stem.conv1.weight"):
        if key in state and state[key].ndim == 4:
            return int(state[key].shape[1])
    return None


def adapt_input_channels(state: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """The state with the stem's first convolution changed to the model's input channels, as timm adapts
    it: to 1 channel by summing over the old ones; from 1 by repeating it, scaled by 1/n; otherwise by
    repeating the old channels cyclically, scaled by old/new. A grey image repeated into every channel then
    gives the same first-layer output as before."""
    first = next(k for k, v in model.state_dict().items() if v.ndim == 4)
    w = state[first]
    old, new = w.shape[1], model.in_chans
    if new == 1:
        adapted = w.sum(1, keepdim=True)
    else:
        repeats = -(-new // old)
        adapted = w.repeat(1, repeats, 1, 1)[:, :new] * (old / new)
    return {**state, first: adapted}


def load_pretrained(model: nn.Module, path: str | os.PathLike, strict_head: bool = False) -> None:
    """Load the weights file at `path` into `model` (see load_state)."""
    load_state(model, read_weights(path), path, strict_head)


def load_state(model: nn.Module, state: dict[str, torch.Tensor], path: str | os.PathLike,
               strict_head: bool = False) -> None:
    """Load a state dict read from `path` (ours or timm's) into `model`. Relative-position tables of
    another size are resized. A classifier whose class count differs is dropped with a message (unless
    strict_head). A stem for another number of input channels is adapted (adapt_input_channels). Any other
    missing or unexpected key is an error: a load never silently leaves weights at their initial values."""
    notes = []  # logged once the load has succeeded: a failed load reports only its error
    state = convert_timm_state_dict(state, model) if is_timm_state_dict(state) else upgrade_state_dict(state)
    own = model.state_dict()
    stem = next(k for k, v in own.items() if v.ndim == 4)  # the stem's first convolution
    if stem in state and state[stem].ndim == 4 and state[stem].shape[1] != own[stem].shape[1]:
        notes.append(f"note: {path}: its stem takes {state[stem].shape[1]}-channel images; adapted to "
                     f"{own[stem].shape[1]} channels (summed or repeated, as timm does)")
        state = adapt_input_channels(state, model)
    head_keys = [k for k in own if k.startswith("head.")]
    mismatched_head = [k for k in head_keys if k in state and state[k].shape != own[k].shape]
    if mismatched_head:
        if strict_head:
            raise ValueError(f"{path}: classifier shape {tuple(state[mismatched_head[0]].shape)} does not "
                             f"match the model's {tuple(own[mismatched_head[0]].shape)}")
        notes.append(f"note: {path}: classifier for {state[mismatched_head[0]].shape[0]} classes dropped; "
                     f"the model keeps its new head for {model.num_classes} classes")
        for k in head_keys:
            state.pop(k, None)
    if not head_keys and getattr(model, "num_classes", None) == 0:
        dropped = [k for k in state if k.startswith("head.")]
        if dropped:
            notes.append(f"note: {path}: classifier dropped; the model has none (num_classes=0)")
            for k in dropped:
                state.pop(k)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        detail = [line.strip() for line in str(e).splitlines() if "size mismatch" in line]
        raise ValueError(f"{path} does not fit this architecture: {detail[0] if detail else e}") from None
    # BatchNorm's step counter does not affect outputs; some exporters leave it out.
    missing = [k for k in missing
               if not (mismatched_head and k in head_keys) and not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise ValueError(f"{path} does not fit this architecture: {'; '.join(parts)} keys")
    for note in notes:
        log.info(note)
