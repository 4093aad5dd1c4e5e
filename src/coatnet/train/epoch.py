"""One epoch of training: `train_one_epoch` takes the optimizer steps of an epoch, one per global batch.

Order of work per optimizer step (global step s, learning rate lr_at(s)): this process's micro-batches of the
global batch (run_data.epoch_data) are forwarded and backwarded, the gradients accumulate (under DDP reduced
once, in the last micro-batch's backward), are clipped, and AdamW steps. Randomness inside the model
(stochastic depth) is an input of its forward drawn from (seed, step, sample index) (`drop_path_noise`), and
any other random draw in a step comes from torch's generator seeded by (seed, step), so a step's result does
not depend on what ran before it.

Names: `model` is the module whose parameters train; `train_forward` is it as the step calls it (wrapped for
DDP, compiled); `epoch_data` is this process's share of the epoch (run_data.EpochData).
"""
from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..data.random import mix_int, uniform_streams
from ..layers import drop_path_streams
from .checkpointer import Checkpointer
from .config import TrainConfig
from .distributed import all_reduce_sums, any_rank, gradient_sync, is_main, rank_and_world
from .messages import note_skipped, warn
from .optim import WeightEMA, skips_on_device
from .optim import step as optimizer_step
from .run_data import EpochData
from .runtime import Runtime
from .schedule import lr_at
from .state import TrainState
from .tracking import Tracker


class NonFiniteLossError(ValueError):
    """The loss became NaN or infinite (the message names the step)."""


# -- the settings an epoch follows ------------------------------------------------------------------------
@dataclass(frozen=True)
class StepSettings:
    """The settings `train_one_epoch` follows: schedule, gradient handling, checkpoint cadence, progress bar."""

    seed: int
    epochs: int  # of the whole run (the progress bar says "epoch 3/10")
    lr: float  # peak learning rate, then the schedule: see schedule.lr_at
    min_lr: float
    schedule: str
    total_steps: int
    warmup_steps: int
    clip_grad: float | None  # global gradient norm clipped to this (None or 0: off)
    skip_nonfinite: bool  # skip a step whose loss is NaN/inf (else raise NonFiniteLossError)
    save_every: int | None  # also checkpoint every this many steps
    stop_at_step: int | None  # stop (the caller checkpoints) once global_step reaches this
    progress_bar: bool

    @classmethod
    def from_config(cls, cfg: TrainConfig, steps_per_epoch: int) -> "StepSettings":
        return cls(seed=cfg.seed, epochs=cfg.epochs, lr=cfg.lr, min_lr=cfg.min_lr, schedule=cfg.schedule,
                   total_steps=steps_per_epoch * cfg.epochs,
                   warmup_steps=int(round(cfg.warmup_epochs * steps_per_epoch)), clip_grad=cfg.clip_grad,
                   skip_nonfinite=cfg.skip_nonfinite, save_every=cfg.save_every, stop_at_step=cfg.stop_at_step,
                   progress_bar=cfg.progress)

    def lr_at(self, step: int) -> float:
        return lr_at(step, self.lr, self.total_steps, self.warmup_steps, self.min_lr, self.schedule)

    def stops_at(self, step: int) -> bool:
        return bool(self.stop_at_step) and step >= self.stop_at_step


def drop_path_noise(seed: int, step: int, indices: torch.Tensor, streams: int) -> torch.Tensor:
    """The model's `drop_path_noise` for samples `indices` (B,) at optimizer step `step`: (B, streams) uniforms,
    column s a function of (seed, step, sample index, s). The masks follow the sample, not its position: the
    same whatever process or micro-batch it lands in, and in backward where checkpointing recomputes them."""
    return uniform_streams(seed, step, indices, [0xD900 + s for s in range(streams)])



# -- one epoch -----------------------------------------------------------------------------------------------
SYNC_EVERY = 20  # optimizer steps between the host's reads of the device's numbers (losses, hits, non-finite)


@dataclass
class _StepOnDevice:
    """One optimizer step whose numbers the host has not read yet (they are read SYNC_EVERY steps at a time)."""

    step: int  # global step
    step_in_epoch: int
    lr: float
    loss_sum: torch.Tensor  # () this process's summed per-sample loss
    correct: torch.Tensor  # () this process's top-1 hits
    images: int  # this process's images
    skipped: torch.Tensor  # () 1.0 where some process's loss was not finite (the step was not applied)


def train_one_epoch(train_forward: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer,
                    ema: WeightEMA | None, epoch_data: EpochData, state: TrainState, settings: StepSettings,
                    runtime: Runtime, checkpointer: Checkpointer, tracker: Tracker | None = None) -> dict | None:
    """Train epoch `epoch_data.epoch` from global batch `epoch_data.start` to its end, one optimizer step per
    global batch, advancing `state` (position, running sums, skipped files and steps); `train_forward` is `model` as
    the step calls it (wrapped, compiled). Checkpoints mid-epoch every settings.save_every steps; `tracker` gets
    each step's loss, lr and img/s.

    Nothing in a step waits for the device: losses, hits and the finiteness of the loss stay there, and the
    host reads them every SYNC_EVERY steps, before a checkpoint and at the epoch's end (`_settle`). A step
    whose loss is NaN or infinite on any process is skipped on the device (the fused AdamW's found_inf, as
    torch.amp's GradScaler uses it; with another optimizer the host reads that one flag per step); when the
    host reads it, it raises NonFiniteLossError naming the first such step, or with skip_nonfinite records and
    warns.

    Returns {"train_loss", "train_top1" (running, with augmentation, over all processes), "lr" (the last
    step's), "img_per_s"}; None when it stopped at settings.stop_at_step first (the caller checkpoints)."""
    _, world = rank_and_world()
    model.train()
    n_batches = len(epoch_data.batch_sizes)
    bar = tqdm(total=n_batches, initial=epoch_data.start, desc=f"epoch {epoch_data.epoch + 1}/{settings.epochs}",
               disable=not (settings.progress_bar and is_main() and sys.stderr.isatty()), leave=False, file=sys.stderr,
               dynamic_ncols=True)
    images_seen, t_train, lr = 0, time.time(), settings.lr_at(state.global_step)
    streams = drop_path_streams(model)
    on_device = skips_on_device(optimizer)
    pending: list[_StepOnDevice] = []
    settle = partial(_settle, pending, state, settings, epoch_data, world, tracker, bar)
    t_settled = time.time()
    with contextlib.closing(epoch_data.batches), bar:  # a shard pass's DataLoader workers end with the epoch
        for step_in_epoch in range(epoch_data.start, n_batches):
            step = state.global_step
            lr = settings.lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            torch.manual_seed(mix_int(settings.seed, step, 0xD809))  # any other randomness: a function of the step
            optimizer.zero_grad(set_to_none=True)
            loss_sum, correct, n = _accumulate_gradients(train_forward, epoch_data, step_in_epoch, step,
                                                         settings.seed, runtime, state, streams)
            skipped = any_rank((~torch.isfinite(loss_sum)).to(torch.float32))
            if on_device:
                if settings.clip_grad:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip_grad)
                optimizer_step(optimizer, skip=skipped)
                if ema is not None:
                    ema.update(model, step, skip=skipped)
            elif not skipped.item():  # one read per step: this optimizer cannot skip on the device
                if settings.clip_grad:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip_grad)
                optimizer.step()
                if ema is not None:
                    ema.update(model, step)
            pending.append(_StepOnDevice(step, step_in_epoch, lr, loss_sum, correct, n, skipped))
            state.global_step, state.step_in_epoch = step + 1, step_in_epoch + 1
            images_seen += n
            last = step_in_epoch + 1 == n_batches
            stops = not last and settings.stops_at(state.global_step)
            saves = not last and bool(settings.save_every) and state.global_step % settings.save_every == 0
            if last or stops or saves or len(pending) >= SYNC_EVERY:
                settle(time.time() - t_settled)
                t_settled = time.time()
            bar.update(1)
            if stops:  # the epoch's last step is checkpointed after evaluation
                return None
            if saves:
                checkpointer.save(state, mid_epoch=True)
                t_settled = time.time()  # the next steps' img/s without the checkpoint's time
    train_seconds = time.time() - t_train
    loss_sum, correct, n = all_reduce_sums(state.sums)
    return {"train_loss": loss_sum / max(n, 1), "train_top1": 100.0 * correct / max(n, 1), "lr": lr,
            "img_per_s": images_seen * world / max(train_seconds, 1e-9)}


def _settle(pending: list[_StepOnDevice], state: TrainState, settings: StepSettings, epoch_data: EpochData, world: int,
            tracker: Tracker | None, bar, seconds: float) -> None:
    """Read the pending steps' numbers from the device at once (the host's one wait in SYNC_EVERY steps) and
    account for them in order: non-finite steps raise or are recorded, the others join the running sums;
    the tracker gets each step (img/s: the mean over the steps read, which took `seconds`)."""
    if not pending:
        return
    numbers = torch.stack([torch.stack([p.loss_sum.float(), p.correct.float(), p.skipped])
                           for p in pending]).tolist()
    img_per_s = sum(p.images for p in pending) * world / max(seconds, 1e-9)
    for p, (loss_sum, correct, skipped) in zip(pending, numbers):
        if skipped:
            where = (f"step {p.step} (epoch {epoch_data.epoch + 1}, batch {p.step_in_epoch + 1}/"
                     f"{len(epoch_data.batch_sizes)})")
            if not settings.skip_nonfinite:
                raise NonFiniteLossError(f"non-finite loss at {where}; lower --lr, or pass --skip-nonfinite")
            state.nonfinite_steps.append(p.step)
            warn(f"warning: non-finite loss at {where}: step skipped")
        else:
            state.add_to_sums(loss_sum, correct, p.images)
        if tracker is not None:  # this process's loss; the main process's tracker writes
            tracker.log_step(p.step + 1, {"loss": loss_sum / max(p.images, 1), "lr": p.lr, "img_per_s": img_per_s})
    last, last_loss = pending[-1], numbers[-1][0]
    bar.set_postfix(loss=f"{last_loss / max(last.images, 1):.4f}", lr=f"{last.lr:.2e}", img_s=f"{img_per_s:.0f}",
                    refresh=False)
    pending.clear()


def micro_batch_loss(train_forward: nn.Module, x: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor,
                     noise: torch.Tensor | None, runtime: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward of one micro-batch: (summed per-sample cross-entropy against soft targets (B, classes),
    top-1 hits against labels (B,)), both 0-d tensors on the device. One graph under torch.compile: the
    stochastic-depth noise (B, L) is an input (see `drop_path_noise`)."""
    with runtime.autocast():
        logits = train_forward(x) if noise is None else train_forward(x, drop_path_noise=noise)
    per_sample = -(targets * F.log_softmax(logits.float(), dim=-1)).sum(-1)
    return per_sample.sum(), (logits.argmax(-1) == labels).sum()


def _accumulate_gradients(train_forward: nn.Module, epoch_data: EpochData, step_in_epoch: int, step: int, seed: int,
                          runtime: Runtime, state: TrainState, streams: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Forward and backward over this process's micro-batches of global batch `step_in_epoch`: the
    gradients become those of the global batch's mean loss (under DDP reduced once, in the last micro-batch's
    backward). Returns (summed loss, top-1 hits) of this process as 0-d tensors on the device, and its
    images. `streams`: the columns of the model's drop_path_noise (0: none)."""
    _, world = rank_and_world()
    batch_size = epoch_data.batch_sizes[step_in_epoch]
    micro_batches = epoch_data.micro_counts[step_in_epoch]
    loss_sum, correct, n = torch.zeros((), device=runtime.device), torch.zeros((), device=runtime.device), 0
    for i in range(micro_batches):
        batch = next(epoch_data.batches)
        if batch.failed:
            note_skipped(state, batch.failures)
        if len(batch.labels) == 0 and world == 1:  # across processes every forward is collective
            continue
        x, targets, labels = epoch_data.inputs(batch)
        noise = runtime.to_device(drop_path_noise(seed, step, batch.indices, streams)) if streams else None
        with gradient_sync(train_forward, i + 1 == micro_batches):
            loss, hits = micro_batch_loss(train_forward, x, targets, labels, noise, runtime)
            # Sum over the global batch divided by its size; DDP averages over ranks, hence * world.
            (loss * (world / batch_size)).backward()
        loss_sum += loss.detach()
        correct += hits
        n += len(batch.labels)
    return loss_sum, correct, n


