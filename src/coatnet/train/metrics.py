"""The run folder's metrics.jsonl (one JSON object per epoch) and curves.png."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..utils import atomic_write, figure


CURVES_NOTE = ("train: running mean over each epoch's steps, in training mode with augmentation; "
               "val: after each epoch, eval mode, no augmentation (flip TTA when on)")


def read_metrics(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_metrics(path: str | os.PathLike, records: list[dict]) -> None:
    """Rewrite the whole file atomically (a few hundred lines at most): never a torn line."""
    with atomic_write(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))  # full precision: the tracker's values


def plot_curves(records: list[dict], path: str | os.PathLike, title: str | None = None) -> None:
    """Loss and top-1 per epoch, train and val, side by side, as a PNG, under `title` (the run and model), with
    a note on what the two curves measure."""
    from matplotlib.ticker import MaxNLocator

    fig = figure(figsize=(10, 4))
    ax_loss, ax_acc = fig.subplots(1, 2)
    for key, label, style in (("train_loss", "train", "-o"), ("val_loss", "val", "-s"),
                              ("train_eval_loss", "train (eval mode)", "--")):
        _plot_key(ax_loss, records, key, label, style)
    for key, label, style in (("train_top1", "train", "-o"), ("val_top1", "val", "-s"),
                              ("train_eval_top1", "train (eval mode)", "--")):
        _plot_key(ax_acc, records, key, label, style)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="top-1 (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.text(0.5, 0.01, CURVES_NOTE, ha="center", va="bottom", fontsize=8, color="0.3")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def _plot_key(ax, records: list[dict], key: str, label: str, style: str) -> None:
    """One curve: `key` over the epochs whose records have it (the evaluated ones, with --eval-every)."""
    points = [(r["epoch"], r[key]) for r in records if key in r]
    if points:
        ax.plot(*zip(*points), style, label=label, markersize=3)
