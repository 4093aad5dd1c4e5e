"""Regenerate the timm parity fixtures in tests/fixtures/timm/ (needs timm; never run by the tests).

For each NAME (default: tests/timm_fixtures.py's NAMES): build timm's model, load the weights that
`timm_fixtures.seeded_weights` makes from its state-dict keys, shapes and a seed, and store what timm
computes in eval mode, float32, for the input `seeded_input` makes: NAME.safetensors holds `logits` and
`features` (after the last stage and norm, before pooling); NAME.json the keys and shapes, the seed, the
versions of timm and torch and a hash of the weights. The weights and the input are not stored: the tests
make them again from the seed. About 240 KB for both fixtures.

    V=$(../shared/tools/timm-env.sh)   # a separate venv with timm (several GB), see that script
    PYTHONPATH=src $V/bin/python scripts/timm_fixtures.py [NAME ...]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from timm_fixtures import FIXTURES, NAMES, seeded_input, seeded_weights, weights_hash  # noqa: E402

SEED = 0
INPUT_SHAPE = [1, 3, 224, 224]  # one image: timm's models of these names take 224 x 224 only


@torch.no_grad()
def make(name: str) -> None:
    model = timm.create_model(name, pretrained=False).eval()
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    weights = seeded_weights(shapes, SEED)
    model.load_state_dict(weights)  # strict: every key timm has
    x = seeded_input(INPUT_SHAPE, SEED)
    features = model.forward_features(x)
    logits = model.forward_head(features)
    FIXTURES.mkdir(parents=True, exist_ok=True)
    save_file({"logits": logits.contiguous(), "features": features.contiguous()}, str(FIXTURES / f"{name}.safetensors"))
    meta = {"timm_model": name, "timm_version": timm.__version__, "torch_version": torch.__version__,
            "seed": SEED, "input_shape": INPUT_SHAPE, "num_params": sum(p.numel() for p in model.parameters()),
            "weights_sha256": weights_hash(weights), "logits_std": float(logits.std()),
            "made_by": "scripts/timm_fixtures.py", "state_dict_shapes": shapes}
    (FIXTURES / f"{name}.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"{name}: logits std {logits.std():.3f}, features std {features.std():.3f}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    for name in sys.argv[1:] or NAMES:
        make(name)
