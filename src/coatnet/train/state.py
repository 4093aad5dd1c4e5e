"""TrainState: where a training run stands, saved as the "progress" JSON of checkpoint-last.state.safetensors.

The JSON keys and their order are those every earlier version wrote, so old run folders resume and
new ones stay readable by older code: "sums" keeps a fourth slot, always 0.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrainState:
    """A run's progress: its position, the current epoch's running sums, the best epoch, what was skipped,
    and one record per completed epoch (the lines of metrics.jsonl)."""

    epoch: int = 0  # completed epochs
    step_in_epoch: int = 0  # optimizer steps done in epoch `epoch + 1` (0: at an epoch boundary)
    global_step: int = 0  # optimizer steps done in all
    # The current epoch's running sums over its steps: this process's, except in a mid-epoch checkpoint,
    # which holds those of all processes (a resume with another number of processes reports the same).
    loss_sum: float = 0.0  # per-sample training loss, summed
    correct: float = 0.0  # top-1 hits
    images: float = 0.0  # images trained on
    best_val_top1: float | None = None
    best_epoch: int | None = None
    skipped_images: list[str] = field(default_factory=list)  # unreadable files, once each, in the order met
    nonfinite_steps: list[int] = field(default_factory=list)  # steps skipped for a NaN or infinite loss
    records: list[dict] = field(default_factory=list)  # one per completed epoch, as in metrics.jsonl
    # Not saved: the unreadable files met in this epoch since the process started (path -> reason).
    skipped_in_epoch: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def sums(self) -> list[float]:
        """[loss_sum, correct, images]."""
        return [self.loss_sum, self.correct, self.images]

    @property
    def position(self) -> str:
        """Where the run stands, in words (for messages)."""
        if self.step_in_epoch == 0:
            return f"end of epoch {self.epoch}"
        return f"step {self.global_step}, in epoch {self.epoch + 1}"

    def add_to_sums(self, loss_sum: float, correct: float, images: float) -> None:
        """Count one optimizer step (a step skipped for a non-finite loss is not counted)."""
        self.loss_sum += loss_sum
        self.correct += correct
        self.images += images

    def note_skipped(self, failed: dict[str, str]) -> list[tuple[str, str]]:
        """Record unreadable files (path -> reason) in this epoch's list and, once per run, in
        skipped_images; returns the (path, reason) pairs not met before in this run."""
        known = set(self.skipped_images)
        new = [(path, reason) for path, reason in failed.items() if path not in known]
        self.skipped_images += [path for path, _ in new]
        self.skipped_in_epoch.update(failed)
        return new

    def end_epoch(self, record: dict) -> bool:
        """Close epoch record["epoch"]: keep its record, reset the position in the epoch and the running
        sums, and track the best val_top1 (the first epoch that reached it; an epoch not evaluated has none).
        Returns whether it improved."""
        self.records.append(record)
        self.epoch, self.step_in_epoch = record["epoch"], 0
        self.loss_sum = self.correct = self.images = 0.0
        if "val_top1" not in record:
            return False
        improved = self.best_val_top1 is None or record["val_top1"] > self.best_val_top1
        if improved:
            self.best_val_top1, self.best_epoch = record["val_top1"], record["epoch"]
        return improved

    def to_dict(self, sums: list[float] | None = None) -> dict:
        """The progress JSON; `sums` ([loss_sum, correct, images]) replaces the running sums, e.g. by those
        of all processes."""
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                "sums": [*(self.sums if sums is None else sums), 0.0], "best_val_top1": self.best_val_top1,
                "best_epoch": self.best_epoch, "skipped_images": self.skipped_images,
                "nonfinite_steps": self.nonfinite_steps, "records": self.records}

    @classmethod
    def from_dict(cls, progress: dict) -> "TrainState":
        """The state a progress JSON describes, from any version: "records" may be missing (empty here;
        metrics.jsonl held them), "sums" may have three or four slots (the fourth is always 0)."""
        loss_sum, correct, images = progress.get("sums", [0.0, 0.0, 0.0])[:3]
        return cls(epoch=progress["epoch"], step_in_epoch=progress["step_in_epoch"],
                   global_step=progress["global_step"], loss_sum=loss_sum, correct=correct, images=images,
                   best_val_top1=progress.get("best_val_top1"), best_epoch=progress.get("best_epoch"),
                   skipped_images=list(progress.get("skipped_images", [])),
                   nonfinite_steps=list(progress.get("nonfinite_steps", [])),
                   records=list(progress.get("records") or []))
