"""TrainConfig.replace(x=None) sets None."""
from __future__ import annotations

from coatnet.train.config import TrainConfig


def test_replace_none_sets_none():
    cfg = TrainConfig(stop_at_step=5, threads=2)
    assert TrainConfig().replace(clip_grad=None).clip_grad is None
    assert cfg.replace(stop_at_step=None, threads=None).stop_at_step is None
    assert cfg.replace(stop_at_step=None).threads == 2  # only what is named changes
