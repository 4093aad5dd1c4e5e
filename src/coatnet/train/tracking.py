"""Experiment tracking where users already look: TensorBoard event files and Weights & Biases runs.

The engine calls a Tracker at three points: after every optimizer step (`log_step`: loss, lr, img/s),
after each epoch's evaluation, before its checkpoint (`log_epoch`: the metrics.jsonl record), and with a
few validation images and their predicted labels (`log_predictions`). Steps are global optimizer steps
(1-based: the number of steps done), so an epoch's record shares the step of its last training step.
Only the main process writes; the others get the no-op Tracker.

Both open lazily, at the first step logged. Resuming: TensorBoard's writer is opened with purge_step = that
step (the checkpoint's + 1), so events that a killed run wrote after its last checkpoint are hidden and the
repeated steps are not shown twice. W&B continues the run whose id the run folder keeps (wandb-run-id); it
drops steps it has already seen.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import torch

from ..data.transforms import normalize, to_unit_range
from ..utils import figure
from .config import parse_log
from .distributed import is_main


class Tracker:
    """Does nothing: the interface, and what a process that does not log gets."""

    def log_step(self, step: int, values: dict[str, float]) -> None:
        """Per optimizer step: values such as loss, lr, img_per_s."""

    def log_epoch(self, step: int, record: dict) -> None:
        """Per epoch: the metrics.jsonl record (epoch, train_loss, val_top1, ...)."""

    def log_predictions(self, step: int, images: torch.Tensor, truth: list[str], predicted: list[str]) -> None:
        """A few validation images (B, C, H, W) in [0, 1] with their true and predicted labels."""

    def close(self) -> None:
        pass


class TensorBoardTracker(Tracker):
    """Event files in <run folder>/tensorboard: scalars train/* per step, val/* and epoch/* per epoch, a figure
    and a text table of predictions per epoch."""

    def __init__(self, log_dir: str | os.PathLike):
        self.log_dir, self._writer = str(log_dir), None

    def writer(self, step: int):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(self.log_dir, purge_step=step)
        return self._writer

    def log_step(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer(step).add_scalar(f"train/{key}", value, step)

    def log_epoch(self, step: int, record: dict) -> None:
        for key, value in epoch_scalars(record).items():
            self.writer(step).add_scalar(key, value, step)
        self.writer(step).flush()

    def log_predictions(self, step: int, images: torch.Tensor, truth: list[str], predicted: list[str]) -> None:
        writer = self.writer(step)
        writer.add_figure("predictions", prediction_figure(images, truth, predicted), step)
        rows = "\n".join(f"| {i} | {t} | {p} |" for i, (t, p) in enumerate(zip(truth, predicted)))
        writer.add_text("predictions", "| image | label | predicted |\n|---|---|---|\n" + rows, step)
        writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


class WandbTracker(Tracker):
    """A Weights & Biases run in <run folder>/wandb (project $WANDB_PROJECT or "coatnet"; WANDB_MODE=offline
    keeps it on disk for `wandb sync`), with the same keys as TensorBoard and the predictions as captioned images."""

    def __init__(self, out: str | os.PathLike, config: dict):
        import wandb

        self.wandb, self.out, self.config, self._run = wandb, Path(out), config, None

    @property
    def run(self):
        if self._run is None:
            id_file = self.out / "wandb-run-id"
            run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
            id_file.write_text(run_id + "\n")
            self._run = self.wandb.init(project=os.environ.get("WANDB_PROJECT", "coatnet"), dir=str(self.out),
                                        id=run_id, name=self.out.resolve().name, resume="allow", config=self.config)
        return self._run

    def log_step(self, step: int, values: dict[str, float]) -> None:
        self.run.log({f"train/{k}": v for k, v in values.items()}, step=step)

    def log_epoch(self, step: int, record: dict) -> None:
        self.run.log(epoch_scalars(record), step=step)

    def log_predictions(self, step: int, images: torch.Tensor, truth: list[str], predicted: list[str]) -> None:
        pictures = [self.wandb.Image(_hwc(img), caption=f"{p} (label: {t})")
                    for img, t, p in zip(images, truth, predicted)]
        self.run.log({"predictions": pictures}, step=step)

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()


class Trackers(Tracker):
    """Several trackers as one."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    def log_step(self, step, values):
        for t in self.trackers:
            t.log_step(step, values)

    def log_epoch(self, step, record):
        for t in self.trackers:
            t.log_epoch(step, record)

    def log_predictions(self, step, images, truth, predicted):
        for t in self.trackers:
            t.log_predictions(step, images, truth, predicted)

    def close(self):
        for t in self.trackers:
            t.close()


def make_tracker(log: str | None, out: str | os.PathLike | None, config: dict) -> Tracker:
    """The trackers `log` names, writing into the run folder `out`, on the main process; the no-op Tracker
    elsewhere and when `log` is empty."""
    kinds = parse_log(log)
    if not kinds or not is_main():
        return Tracker()
    if out is None:
        raise ValueError(f"log={log!r} writes into the run folder: give one (--out)")
    made = [TensorBoardTracker(Path(out) / "tensorboard") if kind == "tensorboard" else
            WandbTracker(out, config) for kind in kinds]
    return made[0] if len(made) == 1 else Trackers(made)


def epoch_scalars(record: dict) -> dict[str, float]:
    """A metrics.jsonl record as scalars: val_* -> val/*, train_* -> epoch/train_*, the rest -> epoch/*."""
    out = {}
    for key, value in record.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or key == "step":
            continue
        out[f"val/{key[4:]}" if key.startswith("val_") else f"epoch/{key}"] = float(value)
    return out


@torch.no_grad()
def sample_predictions(model: torch.nn.Module, source, indices: torch.Tensor, spec, device
                       ) -> tuple[torch.Tensor, list[str], list[str]]:
    """(images (B, C, S, S) in [0, 1], true labels, predicted labels) of source[indices], eval transform."""
    was_training = model.training
    model.eval()
    batch = next(iter(source.batches([indices], spec)))
    logits = model(normalize(batch.images, spec.mean, spec.std).to(device))
    model.train(was_training)
    names = spec.classes
    return (to_unit_range(batch.images), [names[int(i)] for i in batch.labels],
            [names[int(i)] for i in logits.argmax(-1).cpu()])


def _hwc(image: torch.Tensor):
    """(C, H, W) in [0, 1] -> (H, W) or (H, W, 3) uint8 array."""
    arr = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    return arr[0].numpy() if arr.shape[0] == 1 else arr.permute(1, 2, 0).numpy()


def prediction_figure(images: torch.Tensor, truth: list[str], predicted: list[str]):
    """A row of images titled with the predicted label (green: right, red: wrong) over the true one."""
    n = len(images)
    fig = figure(figsize=(1.6 * n, 2.0))
    axes = fig.subplots(1, n, squeeze=False)
    for ax, img, t, p in zip(axes[0], images, truth, predicted):
        ax.imshow(_hwc(img), cmap="gray" if img.shape[0] == 1 else None, vmin=0, vmax=255)
        ax.set_title(f"{p}\nlabel: {t}", fontsize=7, color="green" if p == t else "red")
        ax.axis("off")
    fig.tight_layout()
    return fig
