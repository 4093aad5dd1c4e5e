"""What a training run says, and where: the library logs, the command line decides what reaches the screen.

- `report`: the run's report (device and precision, the score before training, one summary line per epoch)
  on the logger "coatnet.train.report" at INFO; `coatnet train` writes it to stdout (cli.show_library_messages),
  a library caller sees it only if it configures logging.
- `note` and `warn`: notices and warnings on "coatnet.train" (the command line shows them on stderr).
Each is said by the main process only; `quiet` silences the report and the notices, never the warnings.
"""
from __future__ import annotations

import logging

from .distributed import is_main
from .state import TrainState

log = logging.getLogger("coatnet.train")
REPORT = logging.getLogger("coatnet.train.report")


def report(msg: str, quiet: bool = False) -> None:
    """A line of the run's report (scores, per-epoch summaries)."""
    if is_main() and not quiet:
        REPORT.info(msg)


def note(msg: str, quiet: bool = False) -> None:
    """A notice (where a setting came from, what a resume continues)."""
    if is_main() and not quiet:
        log.info(msg)


def warn(msg: str) -> None:
    """A warning, said even when quiet."""
    if is_main():
        log.warning(msg)


def note_skipped(state: TrainState, failed: dict[str, str]) -> None:
    """Count unreadable files once per run (named when first met); `state` lists them per epoch."""
    for path, reason in state.note_skipped(failed):
        warn(f"warning: skipping unreadable file {path}: {reason}")


def summary_line(rec: dict, epochs: int) -> str:
    """An epoch's metrics.jsonl record as the report's one line."""
    parts = [f"epoch {rec['epoch']}/{epochs}", f"train_loss {rec['train_loss']:.4f}",
             f"train_top1 {rec['train_top1']:.2f}"]
    if "train_eval_top1" in rec:
        parts.append(f"train_eval_top1 {rec['train_eval_top1']:.2f}")
    if "val_top1" in rec:  # not on the epochs that --eval-every skips
        parts += [f"val_loss {rec['val_loss']:.4f}", f"val_top1 {rec['val_top1']:.2f}",
                  f"val_top5 {rec['val_top5']:.2f}"]
    parts += [f"lr {rec['lr']:.2e}", f"{rec['img_per_s']:.0f} img/s", f"{rec['seconds']:.1f}s"]
    return "  ".join(parts)
