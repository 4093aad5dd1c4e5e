"""Checkpointer: the checkpoints of a run folder while it trains (which files, in which order, what a
failed write leaves on disk), the best epoch, and resuming from checkpoint-last.state.safetensors.

The file formats are in train/checkpoint.py; this module decides when and what to write.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .checkpoint import (load_train_state, read_checkpoint_info, save_train_state, save_weights_checkpoint,
                         state_path, weights_path)
from .distributed import all_reduce_sums, full_model_state, full_optimizer_state_dict, is_main, load_full_state
from .messages import warn
from .metrics import read_metrics
from .optim import WeightEMA
from .runfolder import writing
from .state import TrainState


class Checkpointer:
    """Saves and resumes the training of `model` with `optimizer` (and `ema`) in the run folder `out`
    (None: nothing is saved). `info` is what each weights file records besides its position and metrics:
    "model_config", "data" (the DataSpec) and "run" (the settings that rebuild data and model)."""

    def __init__(self, out: str | Path | None, model: nn.Module, optimizer: torch.optim.Optimizer,
                 ema: WeightEMA | None, fsdp: bool, info: dict):
        self.out = Path(out) if out else None
        self.model, self.optimizer, self.ema, self.fsdp, self.info = model, optimizer, ema, fsdp, info
        self.saved_at: str | None = None  # where the newest checkpoint on disk stands, in words

    def resume(self, device: torch.device) -> TrainState:
        """Load weights, optimizer and EMA from the run folder's resume state into this process's model
        and optimizer; returns its TrainState, the best epoch as checkpoint-best records it (`_best_on_disk`)."""
        loaded = load_train_state(state_path(self.out))
        if self.fsdp:  # whole states, written by any number of processes, into this sharding
            load_full_state(self.model, loaded["model"], self.optimizer, loaded["optimizer"])
        else:
            self.model.load_state_dict(loaded["model"])
            self.optimizer.load_state_dict(loaded["optimizer"])
            _match_parameter_layouts(self.optimizer)
        if self.ema is not None:
            if loaded["ema"] is None:
                raise ValueError(f"{self.out}: the checkpoint has no EMA weights but ema_decay={self.ema.decay}")
            self.ema.state = {k: v.to(device) for k, v in loaded["ema"].items()}
        progress = loaded["progress"]
        state = TrainState.from_dict(progress)
        if not is_main():  # the checkpoint holds the running sums of all processes: count them once
            state.loss_sum = state.correct = state.images = 0.0
        if progress.get("records") is None:  # written before the records travelled in the checkpoint
            state.records = [r for r in read_metrics(self.out / "metrics.jsonl") if r["epoch"] <= state.epoch]
        state.best_val_top1, state.best_epoch = self._best_on_disk(state)
        self.saved_at = state.position
        return state

    def _best_on_disk(self, state: TrainState) -> tuple[float | None, int | None]:
        """(val_top1, epoch) of the best epoch: as checkpoint-best.safetensors records it (the file is the truth:
        it may have been replaced by hand); (None, None) when there is none (the next epoch writes it). When it
        exists but cannot be read (a transient error, a damaged file), the best that `state` (the resume state)
        records, so that only an epoch better than that one replaces the file."""
        path = weights_path(self.out, "best")
        if not path.exists():
            return None, None
        try:
            info = read_checkpoint_info(path)
            return float(info["metrics"]["val_top1"]), int(info["epoch"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            best, epoch = state.best_val_top1, state.best_epoch
            scored = [r for r in state.records if "val_top1" in r]
            if best is None and scored:  # a resume state written before it recorded the best
                record = max(scored, key=lambda r: r["val_top1"])
                best, epoch = record["val_top1"], record["epoch"]
            warn(f"warning: cannot read {path} ({e}): kept unless an epoch beats val_top1 {best} (epoch {epoch}, "
                 f"as the resume state records it)")
            return best, epoch

    def save(self, state: TrainState, mid_epoch: bool = False, best: bool = False) -> None:
        """Write the last checkpoint, and the best one first when `best` (all processes call: gathering
        sharded states and the running sums is collective). A failed write raises RunFolderError naming
        the file; what was on disk before stays intact (atomic writes)."""
        if self.out is None:
            return
        # Mid-epoch: the epoch's running sums of every process go into the checkpoint, so a run resumed
        # with another number of processes reports the same epoch metrics.
        progress = state.to_dict(all_reduce_sums(state.sums) if mid_epoch else None)
        model_state = full_model_state(self.model) if self.fsdp else self.model.state_dict()
        optim_state = full_optimizer_state_dict(self.optimizer) if self.fsdp else self.optimizer
        if not is_main():
            return
        ema_state = self.ema.state if self.ema is not None else None
        weights = ema_state if ema_state is not None else model_state
        info = {"model_config": self.info["model_config"], "data": self.info["data"], "epoch": state.epoch,
                "step": state.global_step, "metrics": state.records[-1] if state.records else {},
                "run": self.info["run"]}
        kept = (f"the previous checkpoint ({self.saved_at}) is kept" if self.saved_at
                else "no earlier checkpoint exists")
        # Best before the resume state: a kill between the two never loses a better model (a resumed run
        # reads the best epoch from checkpoint-best itself).
        if best:
            with writing(weights_path(self.out, "best"), kept):
                save_weights_checkpoint(weights_path(self.out, "best"), weights, info)
        # The state file alone resumes; the weights file after it is for eval/predict.
        with writing(state_path(self.out), kept):
            save_train_state(state_path(self.out), model_state, ema_state, optim_state, progress)
        self.saved_at = state.position
        with writing(weights_path(self.out, "last"), f"the resume state ({self.saved_at}) was saved"):
            save_weights_checkpoint(weights_path(self.out, "last"), weights, info)


def _match_parameter_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Give each loaded optimizer state tensor its parameter's memory layout. Loading keeps the saved
    (contiguous) strides, while a channels_last model's 3x3 convolution weights have others; the fused AdamW
    kernel walks a parameter and its moments in memory order, so mismatched strides pair wrong elements."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)
