"""The training loop: `train(cfg) -> final metrics`, with resumable, world-size-independent data order.

Order of work per optimizer step (global step s, learning rate lr_at(s)): the epoch's permutation (a
function of seed and epoch) is cut into global batches of `batch_size`; this process takes its shard,
cut into micro-batches; gradients accumulate over them, are clipped, and AdamW steps. Randomness inside
the model (stochastic depth) is reseeded from (seed, step), and the data pipeline's from (seed, epoch,
sample index), so a run resumed from any checkpoint continues exactly as if it had not stopped.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data import build_data
from ..data.random import mix_int, permutation, uniform
from ..data.transforms import AugmentConfig, mix_batch, normalize, rand_augment
from ..layers import drop_path_noise
from ..models import count_params, create_model
from ..models.transfer import freeze_stages
from ..utils import atomic_write
from .checkpoint import read_progress, state_path
from .checkpointer import Checkpointer
from .config import TrainConfig
from .distributed import (all_reduce_sums, apply_fsdp, barrier, convert_sync_batchnorm, is_main, local_threads,
                          rank_and_world, shard, split_micro_batches, wrap_model)
from .evaluate import evaluate, skipped_summary, subset_indices
from .metrics import plot_curves, read_metrics, write_metrics
from .optim import WeightEMA, build_optimizer
from .recalibrate import recalibrate_batchnorm
from .runfolder import prepare_run_folder, remove_stale_temp_files, run_folder_lock, writing
from .runtime import setup_runtime
from .schedule import lr_at
from .state import TrainState


class NonFiniteLossError(ValueError):
    """The loss became NaN or infinite (the message names the step)."""


def augment_config(cfg: TrainConfig) -> AugmentConfig:
    return AugmentConfig(enabled=cfg.augment, crop_scale=tuple(cfg.crop_scale), hflip=cfg.hflip,
                         randaugment_n=cfg.randaugment_n, randaugment_m=cfg.randaugment_m,
                         mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing)


def _train_inputs(batch, aug: AugmentConfig, spec, num_classes: int, seed: int, epoch: int):
    """A decoded batch -> (normalised images (B, C, S, S), soft targets (B, classes))."""
    x = batch.images
    if aug.enabled and aug.randaugment_n > 0:
        x = rand_augment(x, seed, epoch, batch.indices, aug.randaugment_n, aug.randaugment_m)
    x = normalize(x, spec.mean, spec.std)
    mixing = aug if aug.enabled else AugmentConfig(enabled=False, label_smoothing=aug.label_smoothing)
    return mix_batch(x, batch.labels, num_classes, seed, epoch, batch.indices, mixing)


def _drop_path_uniforms(seed: int, step: int, indices: torch.Tensor, batch: int, stream: int) -> torch.Tensor:
    """Uniforms for stochastic depth layer `stream`, one per sample: a function of (seed, step, sample index)."""
    assert batch == len(indices), "stochastic depth needs one sample index per image of the batch"
    return uniform(seed, step, indices, 0xD900 + stream)


def _log(cfg: TrainConfig, msg: str, err: bool = False) -> None:
    if is_main() and (err or not cfg.quiet):
        print(msg, file=sys.stderr if err else sys.stdout, flush=True)


def _summary_line(rec: dict, epochs: int) -> str:
    parts = [f"epoch {rec['epoch']}/{epochs}", f"train_loss {rec['train_loss']:.4f}",
             f"train_top1 {rec['train_top1']:.2f}"]
    if "train_eval_top1" in rec:
        parts.append(f"train_eval_top1 {rec['train_eval_top1']:.2f}")
    parts += [f"val_loss {rec['val_loss']:.4f}", f"val_top1 {rec['val_top1']:.2f}", f"val_top5 {rec['val_top5']:.2f}",
              f"lr {rec['lr']:.2e}", f"{rec['img_per_s']:.0f} img/s", f"{rec['seconds']:.1f}s"]
    return "  ".join(parts)


def train(cfg: TrainConfig) -> dict:
    """Train (or resume) as `cfg` says; returns the final metrics: train_loss, train_top1 (running, with
    augmentation), val_loss, val_top1, val_top5 (%), train_eval_* when cfg.eval_train, seconds, params,
    epochs, steps, best_val_top1, skipped_images (unreadable files, counted once each).

    With a run folder (cfg.out), before any work: the folder is created and proved writable, locked against
    a second training process, cleared of temporaries a killed write left, and a folder that already holds
    a checkpoint is only continued with cfg.resume (never overwritten)."""
    cfg = cfg.validate()
    if not cfg.out or not is_main():
        return _train(cfg)
    out = Path(cfg.out)
    prepare_run_folder(out)
    with run_folder_lock(out):
        stale = remove_stale_temp_files(out)
        if stale:
            _log(cfg, f"removed {len(stale)} temporary file(s) left by an interrupted write: {', '.join(stale)}",
                 err=True)
        if not cfg.resume and (state_path(out).is_file() or (out / "metrics.jsonl").is_file()):
            at = ""
            if state_path(out).is_file():
                with contextlib.suppress(ValueError):
                    at = f" (checkpoint at the {TrainState.from_dict(read_progress(state_path(out))).position})"
            raise ValueError(f"run folder {out} already holds a training run{at}: continue it with "
                             f"--resume {out}, or pass another --out")
        if not cfg.resume or not (out / "config.json").is_file():
            # The settings, at once: a run killed before its first checkpoint can be resumed (from the start).
            with writing(out / "config.json", "nothing was trained yet"), atomic_write(out / "config.json") as tmp:
                tmp.write_text(json.dumps(cfg.replace(resume=False).to_dict(), indent=2) + "\n")
        return _train(cfg)


def _published_preprocessing(cfg: TrainConfig, spec):
    """Starting from published weights (a tag, or a file named after one) on RGB images: normalise with
    the mean and std they were trained with, and (unless --crop-fraction is given) evaluate with their
    centre crop. Recorded in the checkpoint's data spec, so eval and predict use the same."""
    from ..models.pretrained import weights_of

    published = weights_of(cfg.pretrained)
    if published is None or spec.in_chans != 3:
        return spec
    crop = spec.crop_fraction if cfg.crop_fraction is not None else published.crop_pct
    if (spec.mean, spec.std, spec.crop_fraction) != (published.mean, published.std, crop):
        _log(cfg, f"preprocessing of {published.tag}: mean {published.mean}, std {published.std}, "
                  f"eval crop {crop}")
    return dataclasses.replace(spec, mean=published.mean, std=published.std, crop_fraction=crop)


def _train(cfg: TrainConfig) -> dict:
    t_start = time.time()
    rank, world = rank_and_world()
    runtime = setup_runtime(cfg.device, cfg.precision, cfg.channels_last, cfg.compile, cfg.threads or local_threads(),
                            cfg.deterministic)
    train_src, val_src, spec = build_data(cfg.data, cfg.data_dir, cfg.val_fraction, cfg.img_size,
                                          cfg.crop_fraction, cfg.seed)
    spec = _published_preprocessing(cfg, spec)
    cfg = cfg.replace(img_size=spec.img_size, crop_fraction=spec.crop_fraction)
    workers = min(4, os.cpu_count() or 1) if cfg.workers is None else cfg.workers
    train_idx = subset_indices(len(train_src), cfg.train_subset, cfg.seed, stream=1)
    val_idx = subset_indices(len(val_src), cfg.val_subset, cfg.seed, stream=2)
    if len(val_idx) == 0:
        raise ValueError(f"{cfg.data}: no validation images (raise --val-fraction or add a val/ folder)")
    num_classes = len(spec.classes)

    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, num_classes=num_classes, img_size=spec.img_size, in_chans=spec.in_chans,
                         drop_path_rate=cfg.drop_path, layout=cfg.layout, pretrained=cfg.pretrained)
    runtime.prepare(model)
    resuming = bool(cfg.resume and cfg.out and state_path(cfg.out).is_file())
    if cfg.recalibrate_bn and not resuming:  # before freezing: frozen stages keep the statistics of the new size
        calib_idx = train_idx[subset_indices(len(train_idx), cfg.recalibrate_bn, cfg.seed, stream=3)]
        used = recalibrate_batchnorm(model, train_src, calib_idx, spec, runtime, cfg.eval_batch_size, workers,
                                     cfg.strict)
        _log(cfg, f"BatchNorm statistics re-estimated on {used} training images at {spec.img_size}x{spec.img_size}")
    if cfg.freeze_stages:
        freeze_stages(model, cfg.freeze_stages)
    if hasattr(model, "freeze_redundant_parameters"):  # AdamW would turn their roundoff gradients into steps
        model.freeze_redundant_parameters()
    n_params = count_params(model)
    if cfg.fsdp:  # sharding replaces the parameters: before the optimizer sees them
        apply_fsdp(convert_sync_batchnorm(model) if cfg.sync_bn else model, grad_checkpointing=True,
                   param_dtype=torch.bfloat16 if cfg.precision == "bf16" else None)
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, cfg.betas, cfg.layer_decay)
    ema = WeightEMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    eval_model = copy.deepcopy(model) if ema is not None else model
    net = runtime.compiled(model if cfg.fsdp else wrap_model(model, cfg.sync_bn))
    eval_net = runtime.compiled(eval_model) if ema is not None else net
    aug = augment_config(cfg)

    steps_per_epoch = math.ceil(len(train_idx) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = int(round(cfg.warmup_epochs * steps_per_epoch))
    micro = cfg.micro_batch_size or cfg.batch_size  # per-process images per forward/backward
    run_info = {"data": cfg.data, "data_dir": cfg.data_dir, "val_fraction": cfg.val_fraction, "seed": cfg.seed,
                "model": cfg.model, "layout": cfg.layout}
    checkpointer = Checkpointer(cfg.out, model, optimizer, ema, cfg.fsdp,
                                {"model_config": model.config.to_dict(), "data": spec.to_dict(), "run": run_info})
    out = checkpointer.out
    progress = TrainState()
    if out is not None:
        if cfg.resume and state_path(out).is_file():
            progress = checkpointer.resume(runtime.device)
            # The epoch records travel in the checkpoint: metrics.jsonl is rewritten to match it, so a kill
            # between writing the checkpoint and the metrics neither loses nor repeats an epoch.
            if is_main() and progress.records != read_metrics(out / "metrics.jsonl"):
                with writing(out / "metrics.jsonl", f"the checkpoint ({checkpointer.saved_at}) is kept"):
                    write_metrics(out / "metrics.jsonl", progress.records)
            if progress.epoch >= cfg.epochs:
                _log(cfg, f"{out} is complete ({progress.epoch} of {cfg.epochs} epochs): nothing to do "
                          f"(--epochs N extends it)", err=True)
            else:
                _log(cfg, f"resuming {out} at epoch {progress.epoch + 1}, step {progress.global_step}",
                     err=True)
        elif cfg.resume:
            _log(cfg, f"no checkpoint in {out} yet: starting from the beginning", err=True)
        if is_main():
            resolved = {**cfg.replace(resume=False).to_dict(), "classes": list(spec.classes),
                        "model_config": model.config.to_dict(), "data_spec": spec.to_dict(), "params": n_params,
                        "train_images": len(train_idx), "val_images": len(val_idx), "steps_per_epoch": steps_per_epoch,
                        "total_steps": total_steps, "warmup_steps": warmup_steps, "world_size": world}
            with writing(out / "config.json", "nothing was trained yet"), atomic_write(out / "config.json") as tmp:
                tmp.write_text(json.dumps(resolved, indent=2) + "\n")

    def result(stopped: bool = False) -> dict:
        last = progress.records[-1] if progress.records else {}
        res = {k: v for k, v in last.items() if k not in ("seconds",)}
        res.update(seconds=time.time() - t_start, params=n_params, epochs=progress.epoch,
                   steps=progress.global_step, best_val_top1=progress.best_val_top1,
                   skipped_images=len(progress.skipped_images), nonfinite_steps=len(progress.nonfinite_steps))
        res.update(initial)
        if stopped:
            res["stopped_at_step"] = progress.global_step
        if out is not None:
            res["out"] = str(out)
        return res

    def note_skipped(failed: dict[str, str]) -> None:
        """Count unreadable files once per run (named on stderr when first met) and list them per epoch."""
        for path, reason in progress.note_skipped(failed):
            _log(cfg, f"warning: skipping unreadable file {path}: {reason}", err=True)

    from tqdm import tqdm

    initial: dict = {}
    if cfg.eval_before and progress.global_step == 0:
        before = evaluate(eval_net, val_src, val_idx, spec, runtime, cfg.eval_batch_size, workers, cfg.strict)
        note_skipped(before["skipped"])
        initial = {"initial_val_loss": before["loss"], "initial_val_top1": before["top1"]}
        _log(cfg, f"before training: val_loss {before['loss']:.4f}  val_top1 {before['top1']:.2f}")

    for epoch in range(progress.epoch, cfg.epochs):
        t_epoch = time.time()
        order = train_idx[permutation(cfg.seed, epoch, len(train_idx))]
        global_batches = list(order.split(cfg.batch_size))
        start = progress.step_in_epoch
        micro_batches, n_micro = [], []
        for gb in global_batches[start:]:
            parts = split_micro_batches(shard(gb, rank, world), len(gb), world, micro)
            micro_batches += parts
            n_micro.append(len(parts))
        # A streaming source (shards) reads this process's own stream: on resume, skip what it already read.
        skip = ({"skip": sum(len(shard(gb, rank, world)) for gb in global_batches[:start])}
                if getattr(train_src, "streams", False) else {})
        batches = train_src.batches(micro_batches, spec, True, aug, cfg.seed, epoch, workers, cfg.strict, **skip)
        model.train()
        bar = tqdm(total=len(global_batches), initial=start, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not (cfg.progress and is_main()), leave=False, file=sys.stderr, dynamic_ncols=True)
        images_seen, t_train, lr = 0, time.time(), lr_at(progress.global_step, cfg.lr, total_steps,
                                                          warmup_steps, cfg.min_lr, cfg.schedule)
        for step_in_epoch, gb in enumerate(global_batches[start:], start):
            step = progress.global_step
            lr = lr_at(step, cfg.lr, total_steps, warmup_steps, cfg.min_lr, cfg.schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            torch.manual_seed(mix_int(cfg.seed, step, 0xD809))  # any other randomness: a function of the step
            optimizer.zero_grad(set_to_none=True)
            loss_sum = correct = n = 0.0
            for _ in range(n_micro[step_in_epoch - start]):
                batch = next(batches)
                if batch.failed:
                    note_skipped(batch.failures)
                if len(batch.labels) == 0 and world == 1:  # across processes every forward is collective
                    continue
                x, targets = _train_inputs(batch, aug, spec, num_classes, cfg.seed, epoch)
                x, targets = runtime.inputs(x), targets.to(runtime.device)
                # Stochastic depth masks keyed by (seed, step, sample): the same whatever process or
                # micro-batch a sample lands in; backward too, where checkpointing recomputes them.
                noise = partial(_drop_path_uniforms, cfg.seed, step, batch.indices)
                with drop_path_noise(noise):
                    with runtime.autocast():
                        logits = net(x)
                    per_sample = -(targets * F.log_softmax(logits.float(), dim=-1)).sum(-1)
                    # Sum over the global batch divided by its size; DDP averages over ranks, hence * world.
                    (per_sample.sum() * (world / len(gb))).backward()
                loss_sum += per_sample.sum().item()
                correct += (logits.argmax(-1).cpu() == batch.labels).sum().item()
                n += len(batch.labels)
            finite = math.isfinite(loss_sum)
            if world > 1:  # every process must take the same decision
                finite = all_reduce_sums([0.0 if finite else 1.0])[0] == 0.0
            if not finite:
                where = f"step {step} (epoch {epoch + 1}, batch {step_in_epoch + 1}/{len(global_batches)})"
                if not cfg.skip_nonfinite:
                    raise NonFiniteLossError(f"non-finite loss at {where}; lower --lr, or pass --skip-nonfinite")
                progress.nonfinite_steps.append(step)
                _log(cfg, f"warning: non-finite loss at {where}: step skipped", err=True)
                optimizer.zero_grad(set_to_none=True)
            else:
                if cfg.clip_grad:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                optimizer.step()
                if ema is not None:
                    ema.update(model)
                progress.add_to_sums(loss_sum, correct, n)
            progress.global_step = step + 1
            progress.step_in_epoch = step_in_epoch + 1
            images_seen += n
            if bar.n % 10 == 0 or step_in_epoch + 1 == len(global_batches):
                bar.set_postfix(loss=f"{loss_sum / max(n, 1):.4f}", lr=f"{lr:.2e}",
                                img_s=f"{images_seen * world / max(time.time() - t_train, 1e-9):.0f}", refresh=False)
            bar.update(1)
            last_of_epoch = step_in_epoch + 1 == len(global_batches)
            if not last_of_epoch and cfg.save_every and progress.global_step % cfg.save_every == 0:
                checkpointer.save(progress, mid_epoch=True)
            if cfg.stop_at_step and progress.global_step >= cfg.stop_at_step and not last_of_epoch:
                bar.close()
                batches.close()
                checkpointer.save(progress, mid_epoch=True)
                return result(stopped=True)
        bar.close()
        batches.close()  # a folder's DataLoader workers end now, not when the next epoch replaces them
        train_seconds = time.time() - t_train
        loss_sum, correct, n = all_reduce_sums(progress.sums)
        if ema is not None:
            eval_model.load_state_dict(ema.state)
        val = evaluate(eval_net, val_src, val_idx, spec, runtime, cfg.eval_batch_size, workers, cfg.strict)
        note_skipped(val["skipped"])
        rec = {"epoch": epoch + 1, "train_loss": loss_sum / max(n, 1), "train_top1": 100.0 * correct / max(n, 1),
               "val_loss": val["loss"], "val_top1": val["top1"], "val_top5": val["top5"], "lr": lr,
               "img_per_s": images_seen * world / max(train_seconds, 1e-9), "step": progress.global_step}
        if cfg.eval_train:
            tr = evaluate(eval_net, train_src, train_idx, spec, runtime, cfg.eval_batch_size, workers, cfg.strict)
            note_skipped(tr["skipped"])
            rec.update(train_eval_loss=tr["loss"], train_eval_top1=tr["top1"], train_eval_top5=tr["top5"])
        rec["seconds"] = time.time() - t_epoch
        rec["elapsed"] = time.time() - t_start
        improved = progress.end_epoch(rec)
        if progress.skipped_in_epoch:
            _log(cfg, f"warning: epoch {epoch + 1}: {skipped_summary(progress.skipped_in_epoch)}", err=True)
            progress.skipped_in_epoch.clear()
        checkpointer.save(progress, best=improved)
        if out is not None and is_main():
            with writing(out / "metrics.jsonl", f"the checkpoint ({checkpointer.saved_at}) was saved"):
                write_metrics(out / "metrics.jsonl", progress.records)
            with writing(out / "curves.png", f"the checkpoint ({checkpointer.saved_at}) was saved"):
                plot_curves(progress.records, out / "curves.png")
        barrier()
        _log(cfg, _summary_line(rec, cfg.epochs))
        if cfg.stop_at_step and progress.global_step >= cfg.stop_at_step and epoch + 1 < cfg.epochs:
            return result(stopped=True)
    return result()
