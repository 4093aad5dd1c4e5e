"""Prediction on image files and folders: top-k classes with probabilities, with a checkpoint's own eval
transform, in batches decoded by DataLoader workers; unreadable files are reported with the reason, not fatal.
Results go to the caller one by one, or to a CSV / JSON-lines file (PredictionWriter)."""
from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path
from typing import Iterator, Sequence

import torch
from tqdm import tqdm

from ..data.datasets import FolderSource, eval_image
from ..data.images import UnreadableImageError, list_image_files, load_image
from ..data.transforms import normalize
from .checkpoint import load_model
from .runtime import resolve_device


def preprocess(path: str, spec) -> torch.Tensor:
    """One file -> (C, S, S) float in [0, 1] by the eval transform (resize, centre crop)."""
    return eval_image(load_image(path, spec.in_chans), spec).float().div_(255)


@torch.no_grad()
def iter_predictions(model: torch.nn.Module, spec, files: Sequence[str], top_k: int = 5, batch_size: int = 64,
                     workers: int = 0, progress: bool = False, tta_flip: bool = False) -> Iterator[dict]:
    """{"image": path, "top": [{"class", "index", "prob"}, ...]} for each file in order, top_k best first, or
    {"image": path, "error": reason} for a file that is not a readable image. `model` in eval mode; batches
    of `batch_size` decoded by `workers` DataLoader processes; a tqdm bar on stderr with `progress`. `tta_flip`:
    the probabilities averaged with those of the mirror image, as evaluation scores them (`tta_flip`)."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    device = next(model.parameters()).device
    k = max(1, min(top_k, len(spec.classes)))
    index_batches = list(torch.arange(len(files)).split(batch_size))
    source = FolderSource([(str(f), 0) for f in files])
    batches = source.batches(index_batches, spec, workers=workers)
    with tqdm(total=len(files), unit="img", disable=not (progress and sys.stderr.isatty()), file=sys.stderr,
              leave=False, dynamic_ncols=True) as bar:
        for wanted, batch in zip(index_batches, batches):
            found = {}
            if len(batch.labels):
                x = normalize(batch.images.to(device), spec.mean, spec.std)
                probs = model(x).float().softmax(-1)
                if tta_flip:
                    probs = (probs + model(x.flip(-1)).float().softmax(-1)) / 2
                p, i = probs.topk(k)
                for index, probs, classes in zip(batch.indices.tolist(), p.tolist(), i.tolist()):
                    found[index] = [{"class": spec.classes[j], "index": j, "prob": round(q, 6)}
                                    for q, j in zip(probs, classes)]
            reasons = iter(zip(batch.failed, batch.reasons or ["unreadable"] * len(batch.failed)))
            for index in wanted.tolist():  # the batch's files in order; the unreadable ones in the order met
                if index in found:
                    yield {"image": str(files[index]), "top": found[index]}
                else:
                    path, reason = next(reasons)
                    yield {"image": str(path), "error": reason}
            bar.update(len(wanted))


def predict_files(checkpoint: str, paths: list[str], top_k: int = 5, device: str = "cpu",
                  skip_unreadable: bool = False, batch_size: int = 64, workers: int = 0,
                  tta_flip: bool | None = None) -> list[dict]:
    """[{"image": path, "top": [{"class", "index", "prob"}, ...]}] for each file (folders: the images under
    them), top_k best first. `tta_flip`: average with the mirror image (None: as the checkpoint's run evaluated,
    `checkpoint_tta_flip`).

    A file that is not a readable image raises UnreadableImageError (a ValueError naming it and why), or
    with `skip_unreadable` gives {"image": path, "error": reason} and the others are still predicted."""
    files = list_image_files(paths)
    model, spec, info = load_model(checkpoint, resolve_device(device))
    tta_flip = checkpoint_tta_flip(info) if tta_flip is None else tta_flip
    results = list(iter_predictions(model, spec, files, top_k, batch_size, workers, tta_flip=tta_flip))
    for res in results:
        if "error" in res and not skip_unreadable:
            raise UnreadableImageError(res["image"], res["error"])
    return results


def checkpoint_tta_flip(info: dict) -> bool:
    """Whether the run that wrote a checkpoint (its metadata `info`) evaluated each image averaged with its
    mirror image: then prediction does the same, so that predict's answers are eval's."""
    return bool((info.get("run") or {}).get("tta_flip"))


class PredictionWriter:
    """Writes predictions to `path` as they come: CSV for *.csv (path, label_1, prob_1, ..., label_k, prob_k,
    error), JSON lines for *.jsonl / *.json (the dicts of iter_predictions). The file appears complete or
    not at all (written beside it, renamed on close)."""

    def __init__(self, path: str | os.PathLike, top_k: int):
        self.path = self.check(path)
        self.kind, self.top_k = self.path.suffix.lower().lstrip("."), top_k
        self.tmp = self.path.with_name(f".{self.path.name}.tmp")
        self.file = open(self.tmp, "w", newline="")
        self.rows = 0
        if self.kind == "csv":
            self.csv = csv.writer(self.file)
            self.csv.writerow(["path"] + [f"{w}_{n}" for n in range(1, top_k + 1) for w in ("label", "prob")]
                              + ["error"])

    @staticmethod
    def check(path: str | os.PathLike) -> Path:
        """`path` as a Path when predictions can be written there (a .csv or .jsonl name in an existing folder);
        else the error, before any image is read."""
        path = Path(path)
        if path.suffix.lower() not in (".csv", ".jsonl", ".json"):
            raise ValueError(f"--output {path}: name a .csv or .jsonl file")
        if not path.parent.is_dir():
            raise FileNotFoundError(f"--output {path}: there is no folder {path.parent} (create it first)")
        return path

    def write(self, result: dict) -> None:
        self.rows += 1
        if self.kind != "csv":
            self.file.write(json.dumps(result) + "\n")
            return
        top = result.get("top", [])
        cells = [v for t in top for v in (t["class"], f"{t['prob']:.6f}")]
        self.csv.writerow([result["image"], *cells, *[""] * (2 * self.top_k - len(cells)), result.get("error", "")])

    def close(self, keep: bool = True) -> None:
        self.file.close()
        if keep:
            os.replace(self.tmp, self.path)
        elif self.tmp.exists():
            self.tmp.unlink()

    def __enter__(self) -> "PredictionWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.close(keep=exc_type is None)
