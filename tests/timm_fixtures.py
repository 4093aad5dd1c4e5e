"""timm parity fixtures (tests/fixtures/timm/): the weights and input made from a seed, the outputs timm gave.

A fixture NAME is two files: NAME.json (timm's state-dict keys and shapes, the seed, the versions that made
it, a hash of the weights) and NAME.safetensors (timm's float32 eval-mode `logits` and `features`, after
the final stage and norm, before pooling, for `seeded_input`). The weights are not stored: `seeded_weights`
makes them again from the keys, shapes and seed, the same on every machine (numpy's RandomState streams
are frozen). scripts/timm_fixtures.py (needs timm) regenerates the files. Not a test module itself.
"""
from __future__ import annotations

import hashlib
import json
import math
import zlib
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "timm"
NAMES = ["coatnet_nano_rw_224", "coatnet_rmlp_nano_rw_224"]


def _normal(seed: int, key: str, shape: list[int]) -> np.ndarray:
    """Standard normal values of `shape`, from a stream of its own for each key (independent of key order)."""
    return np.random.RandomState([seed, zlib.crc32(key.encode())]).standard_normal(shape)


def seeded_weights(shapes: dict[str, list[int]], seed: int) -> dict[str, torch.Tensor]:
    """A timm-format state dict for these keys and shapes, scaled so that activations stay near unit size
    through the network and every parameter (the relative-position tables and MLPs included) visibly moves
    the output: fan-in scaled weights, norm weights near 1, small biases and means, variances in [0.5, ~2]."""
    state = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.zeros(shape, dtype=torch.int64)
            continue
        n = _normal(seed, key, shape)
        if key.endswith("running_var"):
            value = np.abs(n) * 0.5 + 0.5
        elif key.endswith("gamma") or (len(shape) == 1 and "norm" in key and key.endswith("weight")):
            value = 1 + 0.2 * n
        elif "relative_position_bias_table" in key:
            value = 3 * n  # at unit scale, mirroring every table moves the logits by 0.3%; at 3, by 1%
        elif len(shape) == 1:
            value = 0.1 * n
        else:
            value = n / math.sqrt(math.prod(shape[1:]))
        state[key] = torch.from_numpy(value.astype(np.float32))
    return state


def seeded_input(shape: list[int], seed: int) -> torch.Tensor:
    return torch.from_numpy(_normal(seed, "input", shape).astype(np.float32))


def weights_hash(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the keys and the bytes of the values, in key order."""
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].contiguous().numpy().tobytes())
    return h.hexdigest()


def load(name: str) -> dict:
    """{"meta": NAME.json, "weights": timm-format state dict, "x": input, "logits", "features"}."""
    meta = json.loads((FIXTURES / f"{name}.json").read_text())
    outputs = load_file(str(FIXTURES / f"{name}.safetensors"))
    weights = seeded_weights(meta["state_dict_shapes"], meta["seed"])
    return {"meta": meta, "weights": weights, "x": seeded_input(meta["input_shape"], meta["seed"]), **outputs}
