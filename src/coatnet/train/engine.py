"""The training loop: `train(cfg) -> final metrics`, with resumable, world-size-independent data order.

Order of work per optimizer step (global step s, learning rate lr_at(s)): the epoch's permutation (a
function of seed and epoch) is cut into global batches of `batch_size`; this process takes its shard,
cut into micro-batches; gradients accumulate over them, are clipped, and AdamW steps. Randomness inside
the model (stochastic depth) is an input of its forward drawn from (seed, step, sample index), and the data
pipeline's from (seed, epoch, sample index), so a run resumed from any checkpoint continues exactly as if it
had not stopped.

Where the work happens: DataLoader workers decode and crop (data/); uint8 batches cross to the device, where
RandAugment, normalisation and Mixup run (`train_inputs`); the step's losses and hits stay on the device
and the host reads them once every SYNC_EVERY steps (`train_one_epoch`).

`train` sets up (data, model, optimizer, Checkpointer, TrainState) and runs the epochs; `train_one_epoch`
takes the optimizer steps of one epoch; `evaluate` (train/evaluate.py) scores the model after it.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..data import build_data
from ..data.datasets import Batch, DataSpec
from ..data.random import mix_int, permutation, uniform_streams
from ..data.transforms import AugmentConfig, mix_batch, mix_params, normalize, rand_augment, to_unit_range
from ..layers import drop_path_streams
from ..models import (CoAtNet, build_on_meta, count_macs, count_params, create_model, get_config,
                      inference_model)
from ..models.config import nearest_valid
from ..models.pretrained import weights_of
from ..models.transfer import freeze_stages
from ..utils import atomic_write, plural, read_json_object
from .checkpoint import read_progress, state_path
from .checkpointer import Checkpointer
from .config import TrainConfig
from .distributed import (all_reduce_sums, any_rank, apply_fsdp, barrier, convert_sync_batchnorm, gradient_sync,
                          is_main, local_threads, rank_and_world, shard, split_micro_batches, wrap_model)
from .evaluate import evaluate, skipped_summary, subset_indices
from .metrics import plot_curves, read_metrics, write_metrics
from .optim import WeightEMA, build_optimizer, skips_on_device
from .optim import step as optimizer_step
from .recalibrate import recalibrate_batchnorm
from .redundant import freeze_redundant_parameters
from .runfolder import prepare_run_folder, remove_stale_temp_files, run_folder_lock, writing
from .runtime import Runtime, setup_runtime
from .schedule import lr_at
from .state import TrainState
from .tracking import Tracker, make_tracker, sample_predictions

log = logging.getLogger(__name__)


class NonFiniteLossError(ValueError):
    """The loss became NaN or infinite (the message names the step)."""


def augment_config(cfg: TrainConfig) -> AugmentConfig:
    """The training augmentation `cfg` asks for."""
    return AugmentConfig(enabled=cfg.augment, crop_scale=tuple(cfg.crop_scale), hflip=cfg.hflip,
                         randaugment_n=cfg.randaugment_n, randaugment_m=cfg.randaugment_m,
                         mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing)


# -- what one epoch of training needs ------------------------------------------------------------------------
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


@dataclass
class EpochData:
    """This process's share of one epoch: the epoch's global batches (the first `start` already trained, on
    a resume) as this process's micro-batches, read lazily, and how a micro-batch becomes model inputs."""

    epoch: int  # 0-based
    batch_sizes: list[int]  # images per global batch (all processes together), for every batch of the epoch
    micro_counts: list[int]  # this process's micro-batches per global batch (the same on every process)
    start: int  # global batches trained before (a resumed epoch)
    batches: Iterator[Batch]  # the micro-batches of global batches start, start + 1, ...
    # -> (images (B, C, S, S), soft targets (B, classes), labels (B,)), all on the training device
    inputs: Callable[[Batch], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def train_inputs(batch, aug: AugmentConfig, spec, num_classes: int, seed: int, epoch: int, runtime: Runtime):
    """A decoded batch -> (normalised images (B, C, S, S), soft targets (B, classes), labels (B,)) on the
    device. The uint8 images cross first; RandAugment, normalisation and Mixup/CutMix run on the device. The
    Mixup draws are made here on the host from the sample indices, before the copy (nothing is read back)."""
    mixing = aug if aug.enabled else AugmentConfig(enabled=False, label_smoothing=aug.label_smoothing)
    params = mix_params(seed, epoch, batch.indices, mixing, spec.img_size, spec.img_size)
    x, labels = runtime.to_device(batch.images), runtime.to_device(batch.labels)
    x = to_unit_range(x)
    if aug.enabled and aug.randaugment_n > 0:
        x = rand_augment(x, seed, epoch, runtime.to_device(batch.indices), aug.randaugment_n, aug.randaugment_m)
    x = normalize(x, spec.mean, spec.std)
    x, targets = mix_batch(x, labels, num_classes, seed, epoch, batch.indices, mixing, params)
    return runtime.inputs(x), targets, labels


def drop_path_noise(seed: int, step: int, indices: torch.Tensor, streams: int) -> torch.Tensor:
    """The model's `drop_path_noise` for samples `indices` (B,) at optimizer step `step`: (B, streams) uniforms,
    column s a function of (seed, step, sample index, s). The masks follow the sample, not its position: the
    same whatever process or micro-batch it lands in, and in backward where checkpointing recomputes them."""
    return uniform_streams(seed, step, indices, [0xD900 + s for s in range(streams)])


# -- messages ------------------------------------------------------------------------------------------------
def _log(msg: str, quiet: bool = False) -> None:
    """A line of the run's report on stdout: scores, the per-epoch summaries (the main process's, unless quiet)."""
    if is_main() and not quiet:
        print(msg, flush=True)


def _note(msg: str, quiet: bool = False) -> None:
    """A notice through logging, shown on stderr by the CLI (the main process's, unless quiet)."""
    if is_main() and not quiet:
        log.info(msg)


def _warn(msg: str) -> None:
    """A warning through logging, shown on stderr (the main process's), even when quiet."""
    if is_main():
        log.warning(msg)


def _note_skipped(state: TrainState, failed: dict[str, str]) -> None:
    """Count unreadable files once per run (named on stderr when first met) and list them per epoch."""
    for path, reason in state.note_skipped(failed):
        _warn(f"warning: skipping unreadable file {path}: {reason}")


def _summary_line(rec: dict, epochs: int) -> str:
    parts = [f"epoch {rec['epoch']}/{epochs}", f"train_loss {rec['train_loss']:.4f}",
             f"train_top1 {rec['train_top1']:.2f}"]
    if "train_eval_top1" in rec:
        parts.append(f"train_eval_top1 {rec['train_eval_top1']:.2f}")
    parts += [f"val_loss {rec['val_loss']:.4f}", f"val_top1 {rec['val_top1']:.2f}", f"val_top5 {rec['val_top5']:.2f}",
              f"lr {rec['lr']:.2e}", f"{rec['img_per_s']:.0f} img/s", f"{rec['seconds']:.1f}s"]
    return "  ".join(parts)


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


def train_one_epoch(net: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer, ema: WeightEMA | None,
                    data: EpochData, state: TrainState, settings: StepSettings, runtime: Runtime,
                    checkpointer: Checkpointer, tracker: Tracker | None = None) -> dict | None:
    """Train epoch `data.epoch` from global batch `data.start` to its end, one optimizer step per global
    batch, advancing `state` (position, running sums, skipped files and steps); `net` is `model` as it
    runs forward (wrapped, compiled). Checkpoints mid-epoch every settings.save_every steps; `tracker` gets
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
    n_batches = len(data.batch_sizes)
    bar = tqdm(total=n_batches, initial=data.start, desc=f"epoch {data.epoch + 1}/{settings.epochs}",
               disable=not (settings.progress_bar and is_main() and sys.stderr.isatty()), leave=False, file=sys.stderr,
               dynamic_ncols=True)
    images_seen, t_train, lr = 0, time.time(), settings.lr_at(state.global_step)
    streams = drop_path_streams(model)
    on_device = skips_on_device(optimizer)
    pending: list[_StepOnDevice] = []
    settle = partial(_settle, pending, state, settings, data, world, tracker, bar)
    t_settled = time.time()
    with contextlib.closing(data.batches), bar:  # a shard pass's DataLoader workers end with the epoch
        for step_in_epoch in range(data.start, n_batches):
            step = state.global_step
            lr = settings.lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            torch.manual_seed(mix_int(settings.seed, step, 0xD809))  # any other randomness: a function of the step
            optimizer.zero_grad(set_to_none=True)
            loss_sum, correct, n = _accumulate_gradients(net, data, step_in_epoch, step, settings.seed, runtime,
                                                         state, streams)
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


def _settle(pending: list[_StepOnDevice], state: TrainState, settings: StepSettings, data: EpochData, world: int,
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
            where = f"step {p.step} (epoch {data.epoch + 1}, batch {p.step_in_epoch + 1}/{len(data.batch_sizes)})"
            if not settings.skip_nonfinite:
                raise NonFiniteLossError(f"non-finite loss at {where}; lower --lr, or pass --skip-nonfinite")
            state.nonfinite_steps.append(p.step)
            _warn(f"warning: non-finite loss at {where}: step skipped")
        else:
            state.add_to_sums(loss_sum, correct, p.images)
        if tracker is not None:  # this process's loss; the main process's tracker writes
            tracker.log_step(p.step + 1, {"loss": loss_sum / max(p.images, 1), "lr": p.lr, "img_per_s": img_per_s})
    last, last_loss = pending[-1], numbers[-1][0]
    bar.set_postfix(loss=f"{last_loss / max(last.images, 1):.4f}", lr=f"{last.lr:.2e}", img_s=f"{img_per_s:.0f}",
                    refresh=False)
    pending.clear()


def micro_batch_loss(net: nn.Module, x: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor,
                     noise: torch.Tensor | None, runtime: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward of one micro-batch: (summed per-sample cross-entropy against soft targets (B, classes),
    top-1 hits against labels (B,)), both 0-d tensors on the device. One graph under torch.compile: the
    stochastic-depth noise (B, L) is an input (see `drop_path_noise`)."""
    with runtime.autocast():
        logits = net(x) if noise is None else net(x, drop_path_noise=noise)
    per_sample = -(targets * F.log_softmax(logits.float(), dim=-1)).sum(-1)
    return per_sample.sum(), (logits.argmax(-1) == labels).sum()


def _accumulate_gradients(net: nn.Module, data: EpochData, step_in_epoch: int, step: int, seed: int,
                          runtime: Runtime, state: TrainState, streams: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Forward and backward over this process's micro-batches of global batch `step_in_epoch`: the
    gradients become those of the global batch's mean loss (under DDP reduced once, in the last micro-batch's
    backward). Returns (summed loss, top-1 hits) of this process as 0-d tensors on the device, and its
    images. `streams`: the columns of the model's drop_path_noise (0: none)."""
    _, world = rank_and_world()
    batch_size = data.batch_sizes[step_in_epoch]
    micro_batches = data.micro_counts[step_in_epoch]
    loss_sum, correct, n = torch.zeros((), device=runtime.device), torch.zeros((), device=runtime.device), 0
    for i in range(micro_batches):
        batch = next(data.batches)
        if batch.failed:
            _note_skipped(state, batch.failures)
        if len(batch.labels) == 0 and world == 1:  # across processes every forward is collective
            continue
        x, targets, labels = data.inputs(batch)
        noise = runtime.to_device(drop_path_noise(seed, step, batch.indices, streams)) if streams else None
        with gradient_sync(net, i + 1 == micro_batches):
            loss, hits = micro_batch_loss(net, x, targets, labels, noise, runtime)
            # Sum over the global batch divided by its size; DDP averages over ranks, hence * world.
            (loss * (world / batch_size)).backward()
        loss_sum += loss.detach()
        correct += hits
        n += len(batch.labels)
    return loss_sum, correct, n


# -- the run -------------------------------------------------------------------------------------------------
def check_model(cfg: TrainConfig) -> None:
    """ValueError unless cfg.model is registered, cfg.layout fits it, and cfg.img_size (when given) is a side it
    takes: a multiple of its total stride (32 with the paper's strides; 8 for coatnet_micro, whose S3 and S4 keep
    S2's map)."""
    stride = get_config(cfg.model, layout=cfg.layout).reduction
    if cfg.img_size is not None and cfg.img_size % stride:
        nearest = " or ".join(map(str, nearest_valid(cfg.img_size, stride)))
        raise ValueError(f"img_size={cfg.img_size}: {cfg.model} takes sides that are multiples of {stride} (its total "
                         f"stride); nearest: {nearest}")


def train(cfg: TrainConfig) -> dict:
    """Train (or resume) as `cfg` says; returns the final metrics: train_loss, train_top1 (running, with
    augmentation), val_loss, val_top1, val_top5 (%), train_eval_* when cfg.eval_train, seconds, params,
    epochs, steps, best_val_top1, skipped_images (unreadable files, counted once each), device, precision
    (as resolved), macs_per_image and train_gflops (multiply-adds x 2 x 3 per image x the epochs' mean training
    images/s).

    With a run folder (cfg.out), before any work: the folder is created and proved writable, locked against
    a second training process, cleared of temporaries a killed write left, and a folder that already holds
    a checkpoint is only continued with cfg.resume (never overwritten)."""
    cfg = cfg.validate()
    check_model(cfg)  # an unknown model, a bad layout or size: named before anything is written
    if not cfg.out or not is_main():
        return _train(cfg)
    out = Path(cfg.out)
    prepare_run_folder(out)
    with run_folder_lock(out):
        stale = remove_stale_temp_files(out)
        if stale:
            _warn(f"removed {len(stale)} temporary file(s) left by an interrupted write: {', '.join(stale)}")
        if not cfg.resume and (state_path(out).is_file() or (out / "metrics.jsonl").is_file()):
            at = ""
            if state_path(out).is_file():
                with contextlib.suppress(ValueError):
                    at = f" (checkpoint at the {TrainState.from_dict(read_progress(state_path(out))).position})"
            raise ValueError(f"run folder {out} already holds a training run{at}: continue it with "
                             f"--resume {out}, or pass another --out")
        if not cfg.resume or not (out / "config.json").is_file():
            # The settings, at once: a run killed before its first checkpoint can be resumed (from the start).
            _write_config(out, cfg.replace(resume=False).to_dict())
        with contextlib.closing(make_tracker(cfg.log, out, cfg.to_dict())) as tracker:
            return _train(cfg, tracker)


def interrupted_note(out: str | os.PathLike | None) -> str:
    """For a run stopped by the user (Ctrl-C): what its folder keeps and the command that continues it."""
    if out is None:
        return "nothing was saved (no run folder)"
    out = Path(out)
    if not (out / "config.json").is_file():
        return f"nothing was saved in {out}"
    with contextlib.suppress(ValueError, OSError):
        position = TrainState.from_dict(read_progress(state_path(out))).position
        return f"{out} keeps the checkpoint at the {position}; continue with `coatnet train --resume {out}`"
    return f"{out} has no checkpoint yet; `coatnet train --resume {out}` starts the run over"


def _write_config(out: Path, settings: dict) -> None:
    """out/config.json, atomically."""
    with writing(out / "config.json", "nothing was trained yet"), atomic_write(out / "config.json") as tmp:
        tmp.write_text(json.dumps(settings, indent=2) + "\n")


def _train(cfg: TrainConfig, tracker: Tracker = Tracker()) -> dict:
    """`train` after the run folder checks: set up, then train and evaluate epoch by epoch (`tracker`: where
    the main process logs steps and epochs besides metrics.jsonl)."""
    t_start = time.time()
    _, world = rank_and_world()
    # FSDP2 shards contiguous parameters only: a sharded model keeps the default memory format.
    runtime = setup_runtime(cfg.device, cfg.precision, cfg.channels_last and not cfg.fsdp, cfg.compile,
                            cfg.threads or local_threads(), cfg.deterministic)
    _log(f"device {runtime.device}, precision {runtime.precision} ({runtime.precision_reason})", cfg.quiet)
    cfg, data = _load_data(cfg)
    resuming = bool(cfg.resume and cfg.out) and state_path(cfg.out).is_file()
    model, n_params = _build_model(cfg, data, runtime, resuming)
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, cfg.betas, cfg.layer_decay)
    ema = WeightEMA(model, cfg.ema_decay, cfg.ema_warmup) if cfg.ema_decay > 0 else None
    eval_model = copy.deepcopy(model) if ema is not None else model
    net = runtime.compiled(model if cfg.fsdp else wrap_model(model, cfg.sync_bn))
    eval_net = runtime.compiled(eval_model) if ema is not None else net
    steps_per_epoch = math.ceil(data.epoch_images / cfg.batch_size)
    settings = StepSettings.from_config(cfg, steps_per_epoch)
    run_info = {"data": cfg.data, "data_dir": cfg.data_dir, "val_fraction": cfg.val_fraction, "seed": cfg.seed,
                "model": cfg.model, "layout": cfg.layout, "tta_flip": cfg.eval_flip}
    checkpointer = Checkpointer(cfg.out, model, optimizer, ema, cfg.fsdp,
                                {"model_config": model.config.to_dict(), "data": data.spec.to_dict(), "run": run_info})
    state = _initial_state(cfg, checkpointer, runtime, resuming, settings)
    if state.global_step == 0:
        for message in idle_settings(cfg, settings):
            _warn(f"warning: {message}")
    if checkpointer.out is not None and is_main():
        _write_config(checkpointer.out, {
            **cfg.replace(resume=False).to_dict(), "classes": list(data.spec.classes),
            "model_config": model.config.to_dict(), "data_spec": data.spec.to_dict(), "params": n_params,
            "train_images": len(data.train_idx), "val_images": len(data.val_idx), "epoch_repeats": data.repeats,
            "steps_per_epoch": steps_per_epoch,
            "total_steps": settings.total_steps, "warmup_steps": settings.warmup_steps, "world_size": world,
            "runtime": {"device": str(runtime.device), "precision": runtime.precision,
                        "precision_reason": runtime.precision_reason, "threads": torch.get_num_threads()}})
    initial: dict = {}
    if cfg.eval_before and state.global_step == 0:
        before = _evaluate(cfg, eval_net, data.val_src, data.val_idx, data, runtime, state)
        initial = {"initial_val_loss": before["loss"], "initial_val_top1": before["top1"]}
        _log(f"before training: val_loss {before['loss']:.4f}  val_top1 {before['top1']:.2f}", cfg.quiet)
    # Multiply-adds per image, counted on a weightless copy: the training GFLOP/s in the result.
    macs = count_macs(build_on_meta(model.config)) if hasattr(model, "config") else None
    initial.update(device=str(runtime.device), precision=runtime.precision)
    result = partial(_result, state, n_params, initial, t_start, checkpointer.out, macs)
    if state.epoch >= cfg.epochs:  # a finished run resumed: nothing to train (the warning said so)
        return {**result(), "complete_before": True}

    for epoch in range(state.epoch, cfg.epochs):
        t_epoch = time.time()
        stats = train_one_epoch(net, model, optimizer, ema, _epoch_data(cfg, data, epoch, state.step_in_epoch, runtime),
                                state, settings, runtime, checkpointer, tracker)
        if stats is None:  # stopped at cfg.stop_at_step
            checkpointer.save(state, mid_epoch=True)
            return result(stopped=True)
        if ema is not None:
            eval_model.load_state_dict(ema.state)
        _refresh_batchnorm(cfg, eval_model, ema, data, runtime)
        rec = _epoch_record(cfg, *_scoring(cfg, eval_model, eval_net, runtime), data, state, epoch, stats)
        rec["seconds"] = time.time() - t_epoch
        rec["elapsed"] = time.time() - t_start
        if cfg.log:  # before the checkpoint: a run killed in between repeats the epoch, and its events with it
            tracker.log_epoch(state.global_step, rec)
            tracker.log_predictions(state.global_step, *sample_predictions(eval_model, data.val_src, data.val_idx[:8],
                                                                           data.spec, runtime.device))
        _end_epoch(cfg, state, rec, checkpointer)
        if settings.stops_at(state.global_step) and epoch + 1 < cfg.epochs:
            return result(stopped=True)
    _few_steps_note(cfg, data, steps_per_epoch)
    return result()


# -- set-up --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Data:
    """The run's images: training and validation sources, the (seeded subset) indices used from each."""

    train_src: object
    val_src: object
    spec: DataSpec
    train_idx: torch.Tensor
    val_idx: torch.Tensor
    workers: int  # DataLoader worker processes for folders
    repeats: int = 1  # passes over train_idx per epoch (cfg.min_epoch_images)

    @property
    def epoch_images(self) -> int:
        return len(self.train_idx) * self.repeats


def _load_data(cfg: TrainConfig) -> tuple[TrainConfig, _Data]:
    """The run's data, and `cfg` with img_size and crop_fraction resolved from it."""
    stride = get_config(cfg.model, layout=cfg.layout).reduction
    train_src, val_src, spec = build_data(cfg.data, cfg.data_dir, cfg.val_fraction, cfg.img_size,
                                          cfg.crop_fraction, cfg.seed, size_multiple=stride)
    _note_size(cfg, spec, stride)
    spec = _published_preprocessing(cfg, spec)
    cfg = cfg.replace(img_size=spec.img_size, crop_fraction=spec.crop_fraction)
    workers = min(4, os.cpu_count() or 1) if cfg.workers is None else cfg.workers
    train_idx = subset_indices(len(train_src), cfg.train_subset, cfg.seed, stream=1)
    val_idx = subset_indices(len(val_src), cfg.val_subset, cfg.seed, stream=2)
    for flag, asked, have, split in (("--train-subset", cfg.train_subset, len(train_src), "training"),
                                     ("--val-subset", cfg.val_subset, len(val_src), "validation")):
        if asked is not None and asked > have:
            _warn(f"warning: {flag} {asked} is more than the {have} {split} images of {cfg.data}: using all {have}")
    if len(val_idx) == 0:
        raise ValueError(f"{cfg.data}: no validation images (raise --val-fraction or add a val/ folder)")
    repeats = 1
    if cfg.min_epoch_images and len(train_idx) and not getattr(train_src, "streams", False):
        repeats = math.ceil(cfg.min_epoch_images / len(train_idx))  # a stream is read as it comes: never repeated
    return cfg, _Data(train_src, val_src, spec, train_idx, val_idx, workers, repeats)


def idle_settings(cfg: TrainConfig, settings: StepSettings) -> list[str]:
    """What in `cfg` cannot act within the run's settings.total_steps optimizer steps, one sentence each."""
    steps, found = settings.total_steps, []
    if cfg.ema_decay and not cfg.ema_warmup and cfg.ema_decay ** steps > 0.1:
        found.append(f"ema_decay {cfg.ema_decay} (--ema-decay) averages over about {1 / (1 - cfg.ema_decay):,.0f} "
                     f"steps and this run has {steps}: {100 * cfg.ema_decay ** steps:.0f}% of the weights evaluated "
                     f"and saved (the average's) would be the starting ones; pass --ema-warmup, or --ema-decay 0")
    if settings.warmup_steps >= steps:
        found.append(f"warmup_epochs {cfg.warmup_epochs} (--warmup-epochs) is {settings.warmup_steps} steps, not "
                     f"fewer than the run's {steps}: the lr never reaches {cfg.lr:g}")
    if cfg.save_every > steps:
        found.append(f"save_every {cfg.save_every} (--save-every) is more than the run's {steps} steps: only epoch "
                     f"ends are checkpointed")
    if cfg.stop_at_step is not None and cfg.stop_at_step > steps:
        found.append(f"stop_at_step {cfg.stop_at_step} (--stop-at-step) is past the run's {steps} steps: the run "
                     f"ends first")
    return found


def _note_size(cfg: TrainConfig, spec: DataSpec, stride: int) -> None:
    """Say where a folder's input size came from, and what an upscaling of more than 2x costs."""
    side, size = spec.image_side, spec.img_size
    if cfg.img_size is None and spec.name != "fashion-mnist" and side:
        _note(f"img_size {size}: the training images' median side ({side} px) rounded to a multiple of {stride}, "
              f"the sides {cfg.model} takes (--img-size sets another)", cfg.quiet)
    if side and size > 2 * side:
        _note(f"note: img_size {size} upscales the images {size / side:.1f}x (median side {side} px): about "
              f"{(size / side) ** 2:.0f}x the multiply-adds per image of a size near theirs", cfg.quiet)


def _few_steps_note(cfg: TrainConfig, data: _Data, steps: int) -> None:
    """At the end of a run on a small set from scratch, for a person at a terminal: how to give the next run
    more steps."""
    if steps < 50 and not cfg.min_epoch_images and not cfg.pretrained and sys.stderr.isatty():
        _note(f"{len(data.train_idx)} training images make {steps} optimizer steps per epoch: a short run learns "
              f"little; --recipe small-data (or --min-epoch-images 8000) repeats them within each epoch", cfg.quiet)


def _published_preprocessing(cfg: TrainConfig, spec):
    """Starting from published weights (a tag, or a file named after one) on RGB images: normalise with
    the mean and std they were trained with, and (unless --crop-fraction is given) evaluate with their
    centre crop. Recorded in the checkpoint's data spec, so eval and predict use the same."""
    published = weights_of(cfg.pretrained)
    if published is None or spec.in_chans != 3:
        return spec
    crop = spec.crop_fraction if cfg.crop_fraction is not None else published.crop_pct
    if (spec.mean, spec.std, spec.crop_fraction) != (published.mean, published.std, crop):
        _note(f"preprocessing of {published.tag}: mean {published.mean}, std {published.std}, eval crop {crop}",
              cfg.quiet)
    return dataclasses.replace(spec, mean=published.mean, std=published.std, crop_fraction=crop)


def _build_model(cfg: TrainConfig, data: _Data, runtime: Runtime, resuming: bool) -> tuple[nn.Module, int]:
    """(model, parameter count): created on the runtime's device (initialised from cfg.seed, or loaded from
    cfg.pretrained), its BatchNorm recalibrated (unless `resuming`: the checkpoint's weights follow), stages frozen, and
    sharded under FSDP, as cfg says."""
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, num_classes=len(data.spec.classes), img_size=data.spec.img_size,
                         in_chans=data.spec.in_chans, drop_path_rate=cfg.drop_path, layout=cfg.layout,
                         pretrained=cfg.pretrained)
    runtime.prepare(model)
    if cfg.recalibrate_bn and not resuming:  # before freezing: frozen stages keep the statistics of the new size
        calib_idx = data.train_idx[subset_indices(len(data.train_idx), cfg.recalibrate_bn, cfg.seed, stream=3)]
        used = recalibrate_batchnorm(model, data.train_src, calib_idx, data.spec, runtime, cfg.eval_batch_size,
                                     data.workers, cfg.strict)
        size = data.spec.img_size
        _note(f"BatchNorm statistics re-estimated on {used} training images at {size}x{size}", cfg.quiet)
    if cfg.freeze_stages:
        freeze_stages(model, cfg.freeze_stages)
    freeze_redundant_parameters(model)  # AdamW would turn their roundoff gradients into steps (train/redundant.py)
    n_params = count_params(model)
    if cfg.fsdp:  # sharding replaces the parameters: before the optimizer sees them
        apply_fsdp(convert_sync_batchnorm(model) if cfg.sync_bn else model, grad_checkpointing=True,
                   param_dtype=torch.bfloat16 if runtime.precision == "bf16" else None)
    return model, n_params


def _initial_state(cfg: TrainConfig, checkpointer: Checkpointer, runtime: Runtime, resuming: bool,
                   settings: StepSettings) -> TrainState:
    """A new TrainState; when `resuming`, the run folder's checkpoint's (its weights loaded), and
    metrics.jsonl rewritten to the epoch records it holds. A run is never shortened below the epochs it has
    trained; extending it recomputes the schedule over the new epochs (the lr is a function of the step and
    the total), which is said with the learning rates before and after."""
    out = checkpointer.out
    if out is None or not cfg.resume:
        return TrainState()
    if not resuming:
        _warn(f"no checkpoint in {out} yet: starting from the beginning")
        return TrainState()
    state = checkpointer.resume(runtime.device)
    if state.epoch > cfg.epochs:
        raise ValueError(f"--epochs {cfg.epochs}: {out} has trained {state.epoch} epochs already and cannot be "
                         f"shortened (resume with --epochs {state.epoch} or more)")
    # The epoch records travel in the checkpoint: metrics.jsonl is rewritten to match it, so a kill
    # between writing the checkpoint and the metrics neither loses nor repeats an epoch.
    if is_main() and state.records != read_metrics(out / "metrics.jsonl"):
        with writing(out / "metrics.jsonl", f"the checkpoint ({checkpointer.saved_at}) is kept"):
            write_metrics(out / "metrics.jsonl", state.records)
    if state.epoch >= cfg.epochs:
        _warn(f"{out} is complete ({state.epoch} of {plural(cfg.epochs, 'epoch')}): nothing to do (--epochs N "
              f"extends it)")
    else:
        _note(f"resuming {out} at epoch {state.epoch + 1}, step {state.global_step}")
        # The schedule changes only when the run's length does (--epochs): compare the step counts, not learning
        # rates (a run killed mid-epoch has an lr at its step unlike its last epoch record's, and is not extended).
        before = _recorded_total_steps(out)
        if before is not None and before != settings.total_steps and state.global_step > 0:
            last_lr = lr_at(state.global_step - 1, cfg.lr, before, settings.warmup_steps, cfg.min_lr, cfg.schedule)
            new_lr = settings.lr_at(state.global_step)
            if new_lr != last_lr:  # a constant schedule, past its warmup, does not change
                _warn(f"warning: the learning-rate schedule now spans {cfg.epochs} epochs ({settings.total_steps} "
                      f"steps): the lr goes from {last_lr:.2e} (the last step trained) to {new_lr:.2e} at step "
                      f"{state.global_step}, then decays to {cfg.min_lr:.0e}")
    return state


def _recorded_total_steps(out: Path) -> int | None:
    """The optimizer steps of the run in `out` as its config.json recorded them when it last started."""
    with contextlib.suppress(OSError, ValueError):
        total = read_json_object(out / "config.json").get("total_steps")
        return total if isinstance(total, int) else None
    return None


# -- per epoch -----------------------------------------------------------------------------------------------
_HOST = Runtime(torch.device("cpu"), "fp32", channels_last=False, compile=False)


def _epoch_data(cfg: TrainConfig, data: _Data, epoch: int, start: int, runtime: Runtime = _HOST) -> EpochData:
    """Epoch `epoch`'s global batches (a permutation of the training indices, a function of seed and epoch;
    with data.repeats > 1 that many permutations, each repeat r's indices shifted by r * len(source) so that
    its augmentation is drawn anew, see data/datasets.py) as this process's micro-batches, from global batch
    `start` on, made into inputs on `runtime`'s device."""
    rank, world = rank_and_world()
    n, k = len(data.train_idx), data.repeats
    order = torch.cat([data.train_idx[permutation(cfg.seed, epoch * k + r, n)] + r * len(data.train_src)
                       for r in range(k)])
    global_batches = list(order.split(cfg.batch_size))
    micro = cfg.micro_batch_size or cfg.batch_size  # per-process images per forward/backward
    parts = [split_micro_batches(shard(gb, rank, world), len(gb), world, micro) for gb in global_batches]
    # A streaming source (shards) reads this process's own stream: on resume, skip what it already read.
    skip = ({"skip": sum(len(shard(gb, rank, world)) for gb in global_batches[:start])}
            if getattr(data.train_src, "streams", False) else {})
    aug = augment_config(cfg)
    batches = data.train_src.batches([m for p in parts[start:] for m in p], data.spec, True, aug, cfg.seed, epoch,
                                     data.workers, cfg.strict, device=runtime.device, **skip)
    inputs = partial(train_inputs, aug=aug, spec=data.spec, num_classes=len(data.spec.classes), seed=cfg.seed,
                     epoch=epoch, runtime=runtime)
    return EpochData(epoch, [len(gb) for gb in global_batches], [len(p) for p in parts], start, batches, inputs)


def _refresh_batchnorm(cfg: TrainConfig, eval_model: nn.Module, ema: WeightEMA | None, data: _Data,
                       runtime: Runtime) -> None:
    """"Precise BN" before evaluating and checkpointing: the running statistics of `eval_model` (the model,
    or the EMA weights) re-estimated on cfg.precise_bn training images. Running averages trail the weights
    by about 1/momentum steps, which on a short run leaves the checkpoint's statistics far from what its
    weights produce (eval accuracy near chance after a few dozen steps). The EMA's saved state gets them too."""
    if not cfg.precise_bn:
        return
    idx = data.train_idx[subset_indices(len(data.train_idx), cfg.precise_bn, cfg.seed, stream=5)]
    recalibrate_batchnorm(eval_model, data.train_src, idx, data.spec, runtime, cfg.eval_batch_size, data.workers,
                          cfg.strict)
    if ema is not None:
        ema.state.update({k: v.detach().clone() for k, v in eval_model.state_dict().items()
                          if k.endswith(("running_mean", "running_var"))})


def _evaluate(cfg: TrainConfig, net: nn.Module, source, indices: torch.Tensor, data: _Data, runtime: Runtime,
              state: TrainState) -> dict:
    """`evaluate` with the run's settings; unreadable files it met are noted in `state`."""
    scores = evaluate(net, source, indices, data.spec, runtime, cfg.eval_batch_size, data.workers, cfg.strict,
                      cfg.eval_flip)
    _note_skipped(state, scores["skipped"])
    return scores


def _scoring(cfg: TrainConfig, eval_model: nn.Module, eval_net: nn.Module, runtime: Runtime
             ) -> tuple[nn.Module, Runtime]:
    """The network evaluation runs, and its runtime. On a CPU: `inference_model(eval_model)` (BatchNorm folded,
    oneDNN's fused convolution/linear + GELU kernels, which exist in fp32 only), twice the images/s of the
    training graph in eval mode and equal to it to ~1e-6; elsewhere the training network as it is."""
    if runtime.device.type != "cpu" or cfg.fsdp or not isinstance(eval_model, CoAtNet):
        return eval_net, runtime
    return inference_model(eval_model), dataclasses.replace(runtime, precision="fp32", channels_last=False)


def _epoch_record(cfg: TrainConfig, eval_net: nn.Module, runtime: Runtime, data: _Data, state: TrainState,
                  epoch: int, stats: dict) -> dict:
    """The metrics.jsonl line of the epoch just trained (all but its times): `stats` from train_one_epoch,
    scores on the validation set and, with cfg.eval_train, on the training set."""
    val = _evaluate(cfg, eval_net, data.val_src, data.val_idx, data, runtime, state)
    rec = {"epoch": epoch + 1, "train_loss": stats["train_loss"], "train_top1": stats["train_top1"],
           "val_loss": val["loss"], "val_top1": val["top1"], "val_top5": val["top5"], "lr": stats["lr"],
           "img_per_s": stats["img_per_s"], "step": state.global_step}
    if cfg.eval_train:
        tr = _evaluate(cfg, eval_net, data.train_src, data.train_idx, data, runtime, state)
        rec.update(train_eval_loss=tr["loss"], train_eval_top1=tr["top1"], train_eval_top5=tr["top5"])
    return rec


def _end_epoch(cfg: TrainConfig, state: TrainState, rec: dict, checkpointer: Checkpointer) -> None:
    """Close the epoch in `state`, checkpoint it (the best too, when it improved), then write metrics.jsonl
    and curves.png, and print its summary line."""
    improved = state.end_epoch(rec)
    if state.skipped_in_epoch:
        _warn(f"warning: epoch {rec['epoch']}: {skipped_summary(state.skipped_in_epoch)}")
        state.skipped_in_epoch.clear()
    checkpointer.save(state, best=improved)
    out = checkpointer.out
    if out is not None and is_main():
        with writing(out / "metrics.jsonl", f"the checkpoint ({checkpointer.saved_at}) was saved"):
            write_metrics(out / "metrics.jsonl", state.records)
        with writing(out / "curves.png", f"the checkpoint ({checkpointer.saved_at}) was saved"):
            plot_curves(state.records, out / "curves.png", title=f"{out.name}: {cfg.model} on {cfg.data}")
    barrier()
    _log(_summary_line(rec, cfg.epochs), cfg.quiet)


def _result(state: TrainState, n_params: int, initial: dict, t_start: float, out: Path | None,
            macs: int | None, stopped: bool = False) -> dict:
    """What `train` returns (see there)."""
    last = state.records[-1] if state.records else {}
    res = {k: v for k, v in last.items() if k not in ("seconds",)}
    if macs and state.records:  # forward + backward = 3 forward passes; 2 FLOPs per multiply-add
        img_per_s = sum(r["img_per_s"] for r in state.records) / len(state.records)
        res.update(macs_per_image=macs, train_gflops=round(macs * 6 * img_per_s / 1e9, 2))
    res.update(seconds=time.time() - t_start, params=n_params, epochs=state.epoch, steps=state.global_step,
               best_val_top1=state.best_val_top1, skipped_images=len(state.skipped_images),
               nonfinite_steps=len(state.nonfinite_steps))
    res.update(initial)
    if stopped:
        res["stopped_at_step"] = state.global_step
    if out is not None:
        res["out"] = str(out)
    return res
