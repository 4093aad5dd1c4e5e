"""CoAtNet as a backbone: the stage maps of `create_model(name, features_only=True, out_indices=...)`.

Follows timm's `features_only` convention, which mmdetection, mmsegmentation and
segmentation_models_pytorch consume: feature index 0 is the stem's map (stride 2), 1..4 are S1..S4
(strides 4, 8, 16, 32); `feature_info` tells each output's channels, reduction and module name, both as
`feature_info.channels()` / `.reduction()` / `.module_name()` and as a list of dicts
({"num_chs", "reduction", "module", "index"}). As in timm, the maps are the stages' raw outputs (no final
norm) and the stages after the last chosen one, the final norm and the head are not kept.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch import nn

from .config import check_image_size


class FeatureInfo:
    """What each output of a feature extractor is: channels, reduction (stride), module name. Indexing and
    iteration give timm's dicts; the methods give lists (or one value for an index)."""

    def __init__(self, info: list[dict]):
        self.info = [dict(d) for d in info]

    def channels(self, idx: int | None = None) -> list[int] | int:
        return self._get("num_chs", idx)

    def reduction(self, idx: int | None = None) -> list[int] | int:
        return self._get("reduction", idx)

    def module_name(self, idx: int | None = None) -> list[str] | str:
        return self._get("module", idx)

    def get_dicts(self) -> list[dict]:
        return [dict(d) for d in self.info]

    def _get(self, key: str, idx: int | None):
        return [d[key] for d in self.info] if idx is None else self.info[idx][key]

    def __getitem__(self, idx: int) -> dict:
        return self.info[idx]

    def __iter__(self) -> Iterator[dict]:
        return iter(self.info)

    def __len__(self) -> int:
        return len(self.info)

    def __repr__(self) -> str:
        return f"FeatureInfo({self.info})"


def feature_points(model: nn.Module) -> list[dict]:
    """Every map a CoAtNet can give as a feature, in timm's order: {"num_chs", "reduction", "module",
    "stage"}, "stage" being the index of the last module of `model.stages` it needs (-1: the stem). A split
    stage (CoAtNet-6/7's S3, two modules at one stride) is one feature, after its Transformer part."""
    cfg = model.config
    specs = cfg.stage_specs()
    points = [] if cfg.is_vit else [{"num_chs": cfg.widths[0], "reduction": cfg.stem_stride, "module": "stem",
                                     "stage": -1}]
    for i, spec in enumerate(specs):
        if i + 1 == len(specs) or specs[i + 1].reduction != spec.reduction:
            points.append({"num_chs": spec.width, "reduction": spec.reduction, "module": f"stages.{i}", "stage": i})
    return points


class CoAtNetFeatures(nn.Module):
    """The stem and stages of a CoAtNet, returning the maps at `out_indices` (timm's features_only).

    Input (B, in_chans, H, W), H and W multiples of the deepest chosen output's reduction (32 with S4);
    output a list of (B, C_i, H / r_i, W / r_i). Parameter names are the CoAtNet's ("stem.*", "stages.N.*"),
    so the network's checkpoints load into it (without the head)."""

    def __init__(self, model: nn.Module, out_indices: Sequence[int] = (0, 1, 2, 3, 4)):
        super().__init__()
        points = feature_points(model)
        chosen = []
        for i in out_indices:
            if not -len(points) <= i < len(points):
                raise ValueError(f"out_indices={tuple(out_indices)}: {i} is out of range; this model has "
                                 f"{len(points)} feature maps (indices 0..{len(points) - 1}: "
                                 f"{', '.join(p['module'] for p in points)})")
            chosen.append(i % len(points))
        if not chosen or len(set(chosen)) != len(chosen) or chosen != sorted(chosen):
            raise ValueError(f"out_indices={tuple(out_indices)} must be distinct feature indices in increasing order")
        self.out_indices = tuple(chosen)
        self.feature_info = FeatureInfo([{**{k: v for k, v in points[i].items() if k != "stage"}, "index": i}
                                         for i in chosen])
        self._taps = [points[i]["stage"] for i in chosen]
        self.config = model.config
        self.in_chans = model.in_chans
        self.stem = model.stem
        self.stages = nn.ModuleList(list(model.stages)[:max(self._taps) + 1])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, in_chans, H, W) -> [(B, C_i, H / r_i, W / r_i) for each chosen index]."""
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected a (B, {self.in_chans}, H, W) image batch, got shape {tuple(x.shape)}")
        check_image_size(tuple(x.shape[-2:]), max(self.feature_info.reduction()))
        x = self.stem(x)
        out = [x] if -1 in self._taps else []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self._taps:
                out.append(x)
        return out

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable
