"""The learning rate as a pure function of the optimizer step: linear warmup, then cosine or linear
decay to a floor, or constant (the paper's fine-tuning)."""
from __future__ import annotations

import math

SCHEDULES = ("cosine", "linear", "constant")


def lr_at(step: int, base_lr: float, total_steps: int, warmup_steps: int = 0, min_lr: float = 0.0,
          decay: str = "cosine") -> float:
    """Learning rate for optimizer step `step` (0-based) of `total_steps`.

    Warmup: base_lr * (step + 1) / warmup_steps for the first warmup_steps steps (never exactly 0).
    Then from base_lr at step warmup_steps to min_lr at step total_steps - 1, by half a cosine or a line;
    "constant": base_lr to the end (min_lr unused)."""
    if decay not in SCHEDULES:
        raise ValueError(f"decay={decay!r} must be one of {', '.join(map(repr, SCHEDULES))}")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if decay == "constant":
        return base_lr
    span = max(total_steps - 1 - warmup_steps, 1)
    t = min(max(step - warmup_steps, 0) / span, 1.0)
    shape = 0.5 * (1 + math.cos(math.pi * t)) if decay == "cosine" else 1 - t
    return min_lr + (base_lr - min_lr) * shape
