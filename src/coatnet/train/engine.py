"""Training: `train(cfg) -> final metrics`, with resumable, world-size-independent data order.

`train` checks the run folder and sets up (data, model, optimizer, Checkpointer, TrainState); the files beside
it answer one question each:
- run_data.py: which images, in which order, made into which inputs (RunData, EpochData, train_inputs);
- epoch.py: the optimizer steps of one epoch (train_one_epoch, StepSettings);
- scoring.py: what is evaluated after an epoch, and its metrics.jsonl record;
- checkpointer.py, state.py: what is saved, and the run's progress;
- messages.py: what the run says (the report, notices, warnings), through logging: the library prints nothing.

A run leaves the caller's random state as it found it: every draw is a function of the seed (and step,
epoch, sample), and torch's generators are restored when `train` returns.

Names: `cfg` the settings; `data` the run's images (RunData), `epoch_data` one epoch's share (EpochData);
`model` the module whose parameters train, `train_forward` it as the step calls it (wrapped, compiled);
`eval_model` the weights scored and checkpointed (the EMA's, or the model), `eval_forward` what scoring calls.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import sys
import time
from functools import partial
from pathlib import Path

import torch
from torch import nn

from ..models import build_on_meta, count_macs, count_params, create_model, get_config
from ..models.config import nearest_valid
from ..models.transfer import freeze_stages
from ..utils import atomic_write, plural, read_json_object
from .checkpoint import read_progress, state_path
from .checkpointer import Checkpointer
from .config import TrainConfig
from .distributed import apply_fsdp, barrier, convert_sync_batchnorm, is_main, local_threads, rank_and_world, wrap_model
from .epoch import NonFiniteLossError, StepSettings, train_one_epoch
from .evaluate import skipped_summary, subset_indices
from .messages import note, report, summary_line, warn
from .metrics import plot_curves, read_metrics, write_metrics
from .optim import WeightEMA, build_optimizer
from .recalibrate import recalibrate_batchnorm
from .redundant import freeze_redundant_parameters
from .run_data import RunData, epoch_data, load_data
from .runfolder import prepare_run_folder, remove_stale_temp_files, run_folder_lock, writing
from .runtime import Runtime, setup_runtime
from .schedule import lr_at
from .scoring import epoch_record, eval_forward_on, evaluates_after, refresh_batchnorm, score, train_record
from .state import TrainState
from .tracking import Tracker, make_tracker, sample_predictions

__all__ = ["NonFiniteLossError", "check_model", "idle_settings", "interrupted_note", "train"]


# -- the run -------------------------------------------------------------------------------------------------
def check_model(cfg: TrainConfig) -> None:
    """ValueError unless cfg.model is registered, cfg.layout and cfg.model_args fit it, and cfg.img_size (when
    given) is a side it takes: a multiple of its total stride (32 with the paper's strides; 8 for coatnet_micro,
    whose S3 and S4 keep S2's map)."""
    stride = get_config(cfg.model, **cfg.model_overrides()).reduction
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
    with _caller_random_state_kept(cfg.device):
        result = _train_in_folder(cfg)
    # Every process leaves together, after rank 0's last checkpoint write: a process that left the group
    # (at exit) while another still worked aborted in gloo's teardown one time in ~14 when a run stopped
    # mid-epoch ("terminate called without an active exception", SIGABRT: tests/test_distributed_cli.py).
    barrier()
    return result


@contextlib.contextmanager
def _caller_random_state_kept(device: str):
    """torch's generators (the CPU's, and the GPUs' when the run may use one) restored on the way out: the run
    seeds them for itself (the model's initialisation, each step), and a caller's own draws go on as before."""
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if cuda else []):
        yield


def _train_in_folder(cfg: TrainConfig) -> dict:
    """`train` after the settings' checks: the run folder's (see there), then `_train`."""
    if not cfg.out or not is_main():
        return _train(cfg)
    out = Path(cfg.out)
    prepare_run_folder(out)
    with run_folder_lock(out):
        stale = remove_stale_temp_files(out)
        if stale:
            warn(f"removed {len(stale)} temporary file(s) left by an interrupted write: {', '.join(stale)}")
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
    report(f"device {runtime.device}, precision {runtime.precision} ({runtime.precision_reason})", cfg.quiet)
    cfg, data = load_data(cfg)
    resuming = bool(cfg.resume and cfg.out) and state_path(cfg.out).is_file()
    model, n_params = _build_model(cfg, data, runtime, resuming)
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, cfg.betas, cfg.layer_decay)
    ema = WeightEMA(model, cfg.ema_decay, cfg.ema_warmup) if cfg.ema_decay > 0 else None
    eval_model = copy.deepcopy(model) if ema is not None else model
    train_forward = runtime.compiled(model if cfg.fsdp else wrap_model(model, cfg.sync_bn))
    eval_forward = runtime.compiled(eval_model) if ema is not None else train_forward
    steps_per_epoch = math.ceil(data.epoch_images / cfg.batch_size)
    settings = StepSettings.from_config(cfg, steps_per_epoch)
    run_info = {"data": cfg.data, "data_dir": cfg.data_dir, "val_fraction": cfg.val_fraction, "seed": cfg.seed,
                "model": cfg.model, "layout": cfg.layout, "model_args": list(cfg.model_args),
                "tta_flip": cfg.tta_flip_in_eval}
    checkpointer = Checkpointer(cfg.out, model, optimizer, ema, cfg.fsdp,
                                {"model_config": model.config.to_dict(), "data": data.spec.to_dict(), "run": run_info})
    state = _initial_state(cfg, checkpointer, runtime, resuming, settings)
    if state.global_step == 0:
        for message in idle_settings(cfg, settings):
            warn(f"warning: {message}")
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
        before = score(cfg, eval_forward, data.val_src, data.val_idx, data, runtime, state)
        initial = {"initial_val_loss": before["loss"], "initial_val_top1": before["top1"]}
        report(f"before training: val_loss {before['loss']:.4f}  val_top1 {before['top1']:.2f}", cfg.quiet)
    # Multiply-adds per image, counted on a weightless copy: the training GFLOP/s in the result.
    macs = count_macs(build_on_meta(model.config)) if hasattr(model, "config") else None
    initial.update(device=str(runtime.device), precision=runtime.precision)
    result = partial(_result, state, n_params, initial, t_start, checkpointer.out, macs)
    if state.epoch >= cfg.epochs:  # a finished run resumed: nothing to train (the warning said so)
        return {**result(), "complete_before": True}

    for epoch in range(state.epoch, cfg.epochs):
        t_epoch = time.time()
        stats = train_one_epoch(train_forward, model, optimizer, ema,
                                epoch_data(cfg, data, epoch, state.step_in_epoch, runtime), state, settings, runtime,
                                checkpointer, tracker)
        if stats is None:  # stopped at cfg.stop_at_step
            checkpointer.save(state, mid_epoch=True)
            return result(stopped=True)
        if evaluates_after(cfg, epoch, settings.stops_at(state.global_step)):
            if ema is not None:
                eval_model.load_state_dict(ema.state)
            refresh_batchnorm(cfg, eval_model, ema, data, runtime)
            rec = epoch_record(cfg, *eval_forward_on(cfg, eval_model, eval_forward, runtime), data, state, epoch,
                               stats)
        else:
            rec = train_record(state, epoch, stats)
        rec["seconds"] = time.time() - t_epoch
        rec["elapsed"] = time.time() - t_start
        if cfg.log:  # before the checkpoint: a run killed in between repeats the epoch, and its events with it
            tracker.log_epoch(state.global_step, rec)
            if "val_top1" in rec:  # the evaluated weights' predictions: epochs --eval-every skips have none
                tracker.log_predictions(state.global_step, *sample_predictions(
                    eval_model, data.val_src, data.val_idx[:8], data.spec, runtime.device))
        _end_epoch(cfg, state, rec, checkpointer)
        if settings.stops_at(state.global_step) and epoch + 1 < cfg.epochs:
            return result(stopped=True)
    _few_steps_note(cfg, data, steps_per_epoch)
    return result()


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


def _few_steps_note(cfg: TrainConfig, data: RunData, steps: int) -> None:
    """At the end of a run on a small set from scratch, for a person at a terminal: how to give the next run
    more steps."""
    if steps < 50 and not cfg.min_epoch_images and not cfg.pretrained and sys.stderr.isatty():
        note(f"{len(data.train_idx)} training images make {steps} optimizer steps per epoch: a short run learns "
             f"little; --recipe small-data (or --min-epoch-images 8000) repeats them within each epoch", cfg.quiet)


def _build_model(cfg: TrainConfig, data: RunData, runtime: Runtime, resuming: bool) -> tuple[nn.Module, int]:
    """(model, parameter count): created on the runtime's device (initialised from cfg.seed, or loaded from
    cfg.pretrained), its BatchNorm recalibrated (unless `resuming`: the checkpoint's weights follow), stages frozen, and
    sharded under FSDP, as cfg says."""
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, num_classes=len(data.spec.classes), img_size=data.spec.img_size,
                         in_chans=data.spec.in_chans, drop_path_rate=cfg.drop_path, pretrained=cfg.pretrained,
                         **cfg.model_overrides())
    runtime.prepare(model)
    if cfg.recalibrate_bn and not resuming:  # before freezing: frozen stages keep the statistics of the new size
        calib_idx = data.train_idx[subset_indices(len(data.train_idx), cfg.recalibrate_bn, cfg.seed, stream=3)]
        used = recalibrate_batchnorm(model, data.train_src, calib_idx, data.spec, runtime, cfg.eval_batch_size,
                                     data.workers, cfg.strict)
        size = data.spec.img_size
        note(f"BatchNorm statistics re-estimated on {used} training images at {size}x{size}", cfg.quiet)
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
        warn(f"no checkpoint in {out} yet: starting from the beginning")
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
        warn(f"{out} is complete ({state.epoch} of {plural(cfg.epochs, 'epoch')}): nothing to do (--epochs N "
              f"extends it)")
    else:
        note(f"resuming {out} at epoch {state.epoch + 1}, step {state.global_step}")
        # The schedule changes only when the run's length does (--epochs): compare the step counts, not learning
        # rates (a run killed mid-epoch has an lr at its step unlike its last epoch record's, and is not extended).
        before = _recorded_total_steps(out)
        if before is not None and before != settings.total_steps and state.global_step > 0:
            last_lr = lr_at(state.global_step - 1, cfg.lr, before, settings.warmup_steps, cfg.min_lr, cfg.schedule)
            new_lr = settings.lr_at(state.global_step)
            if new_lr != last_lr:  # a constant schedule, past its warmup, does not change
                warn(f"warning: the learning-rate schedule now spans {cfg.epochs} epochs ({settings.total_steps} "
                      f"steps): the lr goes from {last_lr:.2e} (the last step trained) to {new_lr:.2e} at step "
                      f"{state.global_step}, then decays to {cfg.min_lr:.0e}")
    return state


def _recorded_total_steps(out: Path) -> int | None:
    """The optimizer steps of the run in `out` as its config.json recorded them when it last started."""
    with contextlib.suppress(OSError, ValueError):
        total = read_json_object(out / "config.json").get("total_steps")
        return total if isinstance(total, int) else None
    return None


def _end_epoch(cfg: TrainConfig, state: TrainState, rec: dict, checkpointer: Checkpointer) -> None:
    """Close the epoch in `state`, checkpoint it (the best too, when it improved), then write metrics.jsonl
    and curves.png, and print its summary line."""
    improved = state.end_epoch(rec)
    if state.skipped_in_epoch:
        warn(f"warning: epoch {rec['epoch']}: {skipped_summary(state.skipped_in_epoch)}")
        state.skipped_in_epoch.clear()
    checkpointer.save(state, best=improved)
    out = checkpointer.out
    if out is not None and is_main():
        with writing(out / "metrics.jsonl", f"the checkpoint ({checkpointer.saved_at}) was saved"):
            write_metrics(out / "metrics.jsonl", state.records)
        with writing(out / "curves.png", f"the checkpoint ({checkpointer.saved_at}) was saved"):
            plot_curves(state.records, out / "curves.png", title=f"{out.name}: {cfg.model} on {cfg.data}")
    barrier()
    report(summary_line(rec, cfg.epochs), cfg.quiet)


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
