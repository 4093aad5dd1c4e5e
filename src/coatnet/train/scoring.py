"""Scoring after each epoch: which network is evaluated (`eval_forward`), its BatchNorm statistics refreshed
("precise BN"), and the epoch's metrics.jsonl record.

Names: `eval_model` holds the weights scored and checkpointed (the EMA's, in a copy of the model, or the model
itself); `eval_forward` is what evaluation calls (on a CPU a folded inference copy, elsewhere the compiled
network).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..models import CoAtNet, inference_model
from .config import TrainConfig
from .evaluate import evaluate, subset_indices
from .messages import note_skipped
from .optim import WeightEMA
from .recalibrate import recalibrate_batchnorm
from .run_data import RunData
from .runtime import Runtime
from .state import TrainState


def refresh_batchnorm(cfg: TrainConfig, eval_model: nn.Module, ema: WeightEMA | None, data: RunData,
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


def score(cfg: TrainConfig, eval_forward: nn.Module, source, indices: torch.Tensor, data: RunData,
          runtime: Runtime, state: TrainState) -> dict:
    """`evaluate` with the run's settings; unreadable files it met are noted in `state`."""
    scores = evaluate(eval_forward, source, indices, data.spec, runtime, cfg.eval_batch_size, data.workers,
                      cfg.strict, tta_flip=cfg.tta_flip_in_eval)
    note_skipped(state, scores["skipped"])
    return scores


def eval_forward_on(cfg: TrainConfig, eval_model: nn.Module, eval_forward: nn.Module, runtime: Runtime
                    ) -> tuple[nn.Module, Runtime]:
    """The network evaluation runs after an epoch, and its runtime. On a CPU: `inference_model(eval_model)`
    (BatchNorm folded, oneDNN's fused convolution/linear + GELU kernels, which exist in fp32 only), twice the
    images/s of the training graph in eval mode and equal to it to ~1e-6; elsewhere `eval_forward` as it is."""
    if runtime.device.type != "cpu" or cfg.fsdp or not isinstance(eval_model, CoAtNet):
        return eval_forward, runtime
    return inference_model(eval_model), dataclasses.replace(runtime, precision="fp32", channels_last=False)


def evaluates_after(cfg: TrainConfig, epoch: int, stopping: bool) -> bool:
    """Whether the 0-based `epoch` just trained is evaluated: every cfg.eval_every-th, the last of the run, and
    the last before a stop (`stopping`), so that the run's final record always has its validation scores."""
    return (epoch + 1) % cfg.eval_every == 0 or epoch + 1 >= cfg.epochs or stopping


def train_record(state: TrainState, epoch: int, stats: dict) -> dict:
    """The metrics.jsonl line of an epoch trained and not evaluated (all but its times): `stats` from
    train_one_epoch."""
    return {"epoch": epoch + 1, "train_loss": stats["train_loss"], "train_top1": stats["train_top1"],
            "lr": stats["lr"], "img_per_s": stats["img_per_s"], "step": state.global_step}


def epoch_record(cfg: TrainConfig, eval_forward: nn.Module, runtime: Runtime, data: RunData, state: TrainState,
                 epoch: int, stats: dict) -> dict:
    """The metrics.jsonl line of the epoch just trained and evaluated (all but its times): `stats` from
    train_one_epoch, scores on the validation set and, with cfg.eval_train, on the training set."""
    val = score(cfg, eval_forward, data.val_src, data.val_idx, data, runtime, state)
    trained = train_record(state, epoch, stats)
    # The validation scores after the training ones and before lr (metrics.jsonl's order since its first line).
    head = {k: trained[k] for k in ("epoch", "train_loss", "train_top1")}
    rec = head | {"val_loss": val["loss"], "val_top1": val["top1"], "val_top5": val["top5"]} | trained
    if cfg.eval_train:
        tr = score(cfg, eval_forward, data.train_src, data.train_idx, data, runtime, state)
        rec.update(train_eval_loss=tr["loss"], train_eval_top1=tr["top1"], train_eval_top5=tr["top5"])
    return rec
