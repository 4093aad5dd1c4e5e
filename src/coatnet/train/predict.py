"""Prediction on image files: top-k classes with probabilities, with a checkpoint's own transform."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..data.images import load_image
from ..data.transforms import center_crop_box, normalize


def preprocess(path: str, spec) -> torch.Tensor:
    """One file -> (C, S, S) float in [0, 1] by the eval transform (resize, centre crop)."""
    img = load_image(path, spec.in_chans)
    s = spec.img_size
    x0, y0, w, h = center_crop_box(img.size[1], img.size[0], spec.crop_fraction, s, s)
    img = img.resize((s, s), Image.BILINEAR, box=(x0, y0, x0 + w, y0 + h))
    arr = torch.from_numpy(np.array(img, dtype=np.uint8)).to(torch.float32).div_(255)
    return arr.unsqueeze(0) if arr.ndim == 2 else arr.permute(2, 0, 1)


@torch.no_grad()
def predict_files(checkpoint: str, paths: list[str], top_k: int = 5, device: str = "cpu",
                  skip_unreadable: bool = False) -> list[dict]:
    """[{"image": path, "top": [{"class", "index", "prob"}, ...]}] for each file, top_k best first.

    A file that is not a readable image raises UnreadableImageError (a ValueError naming it and why), or
    with `skip_unreadable` gives {"image": path, "error": reason} and the others are still predicted."""
    from ..data.images import UnreadableImageError
    from .checkpoint import load_model
    from .runtime import resolve_device

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
