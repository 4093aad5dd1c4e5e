"""Prediction on image files: top-k classes with probabilities, with a checkpoint's own transform."""
from __future__ import annotations

import torch

from ..data.datasets import eval_image
from ..data.images import UnreadableImageError, load_image
from ..data.transforms import normalize
from .checkpoint import load_model
from .runtime import resolve_device


def preprocess(path: str, spec) -> torch.Tensor:
    """One file -> (C, S, S) float in [0, 1] by the eval transform (resize, centre crop)."""
    return eval_image(load_image(path, spec.in_chans), spec).float().div_(255)


@torch.no_grad()
def predict_files(checkpoint: str, paths: list[str], top_k: int = 5, device: str = "cpu",
                  skip_unreadable: bool = False) -> list[dict]:
    """[{"image": path, "top": [{"class", "index", "prob"}, ...]}] for each file, top_k best first.

    A file that is not a readable image raises UnreadableImageError (a ValueError naming it and why), or
    with `skip_unreadable` gives {"image": path, "error": reason} and the others are still predicted."""
    device = resolve_device(device)
    model, spec, _ = load_model(checkpoint, device)
    k = max(1, min(top_k, len(spec.classes)))
    results = []
    for path in paths:
        try:
            image = preprocess(path, spec)
        except UnreadableImageError as e:
            if not skip_unreadable:
                raise
            results.append({"image": str(path), "error": e.reason})
            continue
        x = normalize(image.unsqueeze(0), spec.mean, spec.std).to(device)
        probs = model(x).float().softmax(-1)[0]
        p, i = probs.topk(k)
        results.append({"image": str(path), "top": [{"class": spec.classes[j], "index": j, "prob": round(q, 6)}
                                                     for q, j in zip(p.tolist(), i.tolist())]})
    return results
