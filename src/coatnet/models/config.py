"""Configuration of a CoAtNet as frozen data (paper, Sec. 3 and Table 3).

A network is a stem S0 and four stages S1..S4; each stage is MBConv ("C") or Transformer ("T") blocks.
`layout` names the block type of S1..S4 ("C-C-T-T" is CoAtNet). A stage given two letters ("CT") and
a pair of depths and widths is split, as S3 of CoAtNet-6/7: MBConv blocks at stride 2, then
Transformer blocks at stride 1 and a wider width. "ViT-Rel" is a 16x16 patch stem followed by one
stage of relative-attention blocks (depths and widths then hold one value each).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Union

from ..utils import did_you_mean

Size = Union[int, tuple[int, int]]
StageValue = Union[int, tuple[int, int]]

LAYOUTS = ("C-C-C-C", "C-C-C-T", "C-C-T-T", "C-T-T-T", "ViT-Rel")
ACTIVATIONS = ("gelu", "silu", "relu")
POOL_TYPES = ("avg", "max", "max3x3")


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} must be True or False")


def _check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name}={value!r} must be a {'non-negative' if allow_zero else 'positive'} number")


@dataclass(frozen=True)
class MBConvConfig:
    """Options of the MBConv blocks (paper eq. 5; Sandler et al. 2018)."""

    expand_ratio: float = 4.0  # hidden width = expand_ratio * (input or output width)
    expand_from: str = "output"  # widths the hidden layer from the "output" (matches the paper's FLOPs) or "input"
    se_ratio: float = 0.25  # squeeze-excite width = se_ratio * (se_from width); 0 disables SE
    se_from: str = "input"  # "input" width (EfficientNet), "output" width or "expanded" hidden width (timm)
    se_activation: str = "gelu"  # activation inside squeeze-excite: "gelu", "silu" or "relu"
    se_placement: str = "after_norm"  # SE after norm2 + activation, or "before_norm": between depthwise conv and norm2
    downsample: str = "conv1x1"  # where the stride sits: "conv1x1" (paper eq. 5), "dwconv" (Stride-2 DConv)
    #                              or "pool" (2x2 average pooling after the pre-norm, before the expansion)
    activation: str = "gelu"  # activation of the MBConv blocks and the stem: "gelu" (paper), "silu" or "relu"
    pre_norm_act: bool = False  # apply the activation after the pre-norm too (timm's early "rw" models)
    shortcut_bias: bool = True  # bias of the 1x1 projection on the downsampling shortcut
    project_bias: bool = True  # bias of the final 1x1 projection conv
    kernel_size: int = 3  # depthwise kernel
    norm_eps: float = 1e-5  # BatchNorm epsilon (also the stem's)

    def validate(self) -> None:
        _check_positive("expand_ratio", self.expand_ratio)
        _check_choice("expand_from", self.expand_from, ("input", "output"))
        _check_positive("se_ratio", self.se_ratio, allow_zero=True)
        _check_choice("se_from", self.se_from, ("input", "output", "expanded"))
        _check_choice("se_activation", self.se_activation, ACTIVATIONS)
        _check_choice("se_placement", self.se_placement, ("after_norm", "before_norm"))
        _check_choice("downsample", self.downsample, ("conv1x1", "dwconv", "pool"))
        _check_choice("activation", self.activation, ACTIVATIONS)
        for name in ("pre_norm_act", "shortcut_bias", "project_bias"):
            _check_bool(name, getattr(self, name))
        if not isinstance(self.kernel_size, int) or self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size={self.kernel_size!r} must be a positive odd integer")
        _check_positive("norm_eps", self.norm_eps)


@dataclass(frozen=True)
class TransformerConfig:
    """Options of the Transformer blocks (paper eq. 3 and Sec. 2.2)."""

    head_dim: int = 32  # channels per attention head
    mlp_ratio: float = 4.0  # FFN hidden width = mlp_ratio * width
    norm: str = "layernorm"  # "layernorm" (paper) or "batchnorm" (the paper's ablation, Table 8)
    attention_bias: str = "relative"  # "relative" (pre-softmax), "relative_post" or "none"
    relative_bias: str = "table"  # where w[i-j] comes from: a learned "table" (paper) or an "mlp" over
    #                               log-spaced offsets (timm's "rmlp" models; nothing to resize)
    relative_mlp_width: int = 512  # hidden width of that MLP
    table_resize: str = "bilinear"  # how a table moves to another resolution: "bilinear", or "geometric"
    #                                 (timm's: source offsets placed on a geometric grid, then linear)
    widen_in: str = "qkv"  # where a block that widens does so: in "qkv" (paper) or in the output "proj" (timm rw)
    shortcut_bias: bool = True  # bias of the linear projection on the downsampling shortcut
    layer_scale: float = 0.0  # initial per-channel scale of both residual branches (CaiT); 0 disables it
    norm_eps: float = 1e-5  # LayerNorm / BatchNorm epsilon (also the final norm's)

    def validate(self) -> None:
        if isinstance(self.head_dim, bool) or not isinstance(self.head_dim, int) or self.head_dim < 1:
            raise ValueError(f"head_dim={self.head_dim!r} must be a positive integer")
        _check_positive("mlp_ratio", self.mlp_ratio)
        _check_choice("norm", self.norm, ("layernorm", "batchnorm"))
        _check_choice("attention_bias", self.attention_bias, ("relative", "relative_post", "none"))
        _check_choice("relative_bias", self.relative_bias, ("table", "mlp"))
        if isinstance(self.relative_mlp_width, bool) or not isinstance(self.relative_mlp_width, int) \
                or self.relative_mlp_width < 1:
            raise ValueError(f"relative_mlp_width={self.relative_mlp_width!r} must be a positive integer")
        _check_choice("table_resize", self.table_resize, ("bilinear", "geometric"))
        _check_choice("widen_in", self.widen_in, ("qkv", "proj"))
        _check_bool("shortcut_bias", self.shortcut_bias)
        _check_positive("layer_scale", self.layer_scale, allow_zero=True)
        _check_positive("norm_eps", self.norm_eps)


@dataclass(frozen=True)
class StageSpec:
    """One run of identical-type blocks, as built (a split stage yields two)."""

    block: str  # "C" or "T"
    depth: int
    width: int
    stride: int  # of the first block
    reduction: int  # total stride of this stage's output relative to the input image
    ends_stage: bool = True  # False for the first part of a split stage (S3 of CoAtNet-6/7)


@dataclass(frozen=True)
class CoAtNetConfig:
    """A whole network. Every field is validated by `validate()`, which names the offending field."""

    depths: tuple[StageValue, ...] = (2, 2, 3, 5, 2)  # blocks in S0..S4 (S0: stem convolutions)
    widths: tuple[StageValue, ...] = (64, 96, 192, 384, 768)  # channels of S0..S4
    layout: str = "C-C-T-T"  # block type of S1..S4, or "ViT-Rel"
    mbconv: MBConvConfig = field(default_factory=MBConvConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    stem_stride: int = 2  # stride of the first stem convolution
    strides: tuple[int, ...] = (2, 2, 2, 2)  # stride of the first block of S1..S4 (paper: every stage halves the
    #                                          resolution); 1 keeps it, e.g. to give S3 a 4x4 map at 32 px
    stem_hidden_width: int = 0  # width of the stem's convolutions before its last; 0: the stem's width
    patch_size: int = 16  # ViT-Rel only: patch stem kernel and stride
    pool_type: str = "avg"  # stride-2 pooling when downsampling: 2x2 "avg" or "max", or "max3x3" (padding 1)
    shortcut_projection: str = "strided"  # when a shortcut gets a 1x1 projection: on every "strided" block
    #                                       (paper eq. 4-5) or only on a "width_change" (timm)
    head_hidden: int = 0  # pre-logits layer: pool -> norm -> linear(head_hidden) -> tanh -> classifier
    #                       (the final norm then follows pooling); 0: pool -> classifier after a final norm
    drop_path_rate: float = 0.0  # stochastic depth, rising linearly from 0 over all blocks
    in_chans: int = 3
    num_classes: int = 1000  # 0: no classifier, forward returns pooled features
    img_size: Size = 224  # sizes the relative-position tables; (H, W) or one int for square

    # ----------------------------------------------------------------------------------------------
    @property
    def image_size(self) -> tuple[int, int]:
        s = self.img_size
        return (s, s) if isinstance(s, int) else tuple(s)

    @property
    def is_vit(self) -> bool:
        return self.layout == "ViT-Rel"

    @property
    def reduction(self) -> int:
        """Total stride of the network: input sides must be multiples of it."""
        return self.patch_size if self.is_vit else self.stem_stride * math.prod(self.strides)

    def stage_specs(self) -> list[StageSpec]:
        """The stages S1..S4 as built: a split stage becomes two specs (MBConv then Transformer)."""
        if self.is_vit:
            return [StageSpec("T", self.depths[0], self.widths[0], 1, self.patch_size)]
        specs, reduction = [], self.stem_stride
        for letters, depth, width, stride in zip(self.layout.split("-"), self.depths[1:], self.widths[1:],
                                                 self.strides):
            reduction *= stride
            if len(letters) == 1:
                specs.append(StageSpec(letters, depth, width, stride, reduction))
            else:  # split stage: first part downsamples, second keeps the resolution
                specs.append(StageSpec(letters[0], depth[0], width[0], stride, reduction, ends_stage=False))
                specs.append(StageSpec(letters[1], depth[1], width[1], 1, reduction))
        return specs

    @property
    def num_features(self) -> int:
        return self.stage_specs()[-1].width

    def validate(self) -> "CoAtNetConfig":
        if not isinstance(self.layout, str):
            raise ValueError(f"layout={self.layout!r} must be a string such as 'C-C-T-T' or 'ViT-Rel'")
        n_stages = 1 if self.is_vit else 5
        for name in ("depths", "widths"):
            value = getattr(self, name)
            if not isinstance(value, (tuple, list)) or len(value) != n_stages:
                what = "one value (the Transformer stage)" if self.is_vit else "five values (S0..S4)"
                raise ValueError(f"{name}={value!r} must hold {what}")
        if not self.is_vit:
            letters = self.layout.split("-")
            if len(letters) != 4 or any(not s or set(s) - {"C", "T"} or len(s) > 2 for s in letters):
                raise ValueError(
                    f"layout={self.layout!r} must be four stages of 'C' (MBConv) or 'T' (Transformer) "
                    f"joined by '-', e.g. 'C-C-T-T', a split stage written 'CT'; or one of {', '.join(LAYOUTS)}"
                )
            for i, s in enumerate(letters, start=1):
                for name in ("depths", "widths"):
                    value = getattr(self, name)[i]
                    if len(s) == 2 and not (isinstance(value, (tuple, list)) and len(value) == 2):
                        raise ValueError(f"{name}[{i}]={value!r}: split stage '{s}' needs a pair of values")
                    if len(s) == 1 and isinstance(value, (tuple, list)):
                        raise ValueError(f"{name}[{i}]={value!r}: stage '{s}' takes one value, not a pair")
        for name in ("depths", "widths"):
            for v in _flatten(getattr(self, name)):
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise ValueError(f"{name}={getattr(self, name)!r}: every entry must be a positive integer")
        if not isinstance(self.strides, (tuple, list)) or len(self.strides) != 4 \
                or any(isinstance(v, bool) or v not in (1, 2) for v in self.strides):
            raise ValueError(f"strides={self.strides!r} must be four values of 1 or 2 (S1..S4)")
        self.mbconv.validate()
        self.transformer.validate()
        head_dim = self.transformer.head_dim
        for spec in self.stage_specs():
            if spec.block == "T" and spec.width % head_dim:
                raise ValueError(f"head_dim={head_dim} does not divide the Transformer width {spec.width}")
        for name in ("stem_stride", "patch_size", "in_chans"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} must be a positive integer")
        for name in ("stem_hidden_width", "head_hidden"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name}={v!r} must be a non-negative integer")
        _check_choice("shortcut_projection", self.shortcut_projection, ("strided", "width_change"))
        if self.stem_stride not in (1, 2):
            raise ValueError(f"stem_stride={self.stem_stride!r} must be 1 or 2")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(f"num_classes={self.num_classes!r} must be a non-negative integer")
        _check_choice("pool_type", self.pool_type, POOL_TYPES)
        if not isinstance(self.drop_path_rate, (int, float)) or not 0 <= self.drop_path_rate < 1:
            raise ValueError(f"drop_path_rate={self.drop_path_rate!r} must be in [0, 1)")
        s = self.img_size
        if not (isinstance(s, int) and not isinstance(s, bool)) and not (
            isinstance(s, (tuple, list)) and len(s) == 2 and all(isinstance(v, int) for v in s)
        ):
            raise ValueError(f"img_size={s!r} must be an int or a pair (H, W)")
        check_image_size(self.image_size, self.reduction, what="img_size")
        return self

    # ----------------------------------------------------------------------------------------------
    def replace(self, **overrides: Any) -> "CoAtNetConfig":
        """A copy with fields replaced. Nested fields may be named flat (`head_dim=64`) or dotted
        (`transformer.head_dim`); overrides equal to None are ignored."""
        top, nested = {}, {"mbconv": {}, "transformer": {}}
        nested_fields = {k: {f.name for f in dataclasses.fields(v)} for k, v in
                         (("mbconv", MBConvConfig), ("transformer", TransformerConfig))}
        for key, value in overrides.items():
            if value is None:
                continue
            group, _, name = key.rpartition(".")
            if group:
                if group not in nested or name not in nested_fields[group]:
                    raise ValueError(f"unknown config field {key!r}{did_you_mean(key, self._field_names())}")
                nested[group][name] = value
            elif name in {f.name for f in dataclasses.fields(self)}:
                top[name] = tuple(value) if isinstance(value, list) else value
            else:
                owners = [g for g, names in nested_fields.items() if name in names]
                if len(owners) != 1:
                    raise ValueError(f"unknown config field {key!r}{did_you_mean(key, self._field_names())}"
                                     if not owners else
                                     f"ambiguous config field {key!r}: write one of "
                                     + ", ".join(f"{g}.{name}" for g in owners))
                nested[owners[0]][name] = value
        for group, values in nested.items():
            if values:
                top[group] = dataclasses.replace(getattr(self, group), **values)
        return dataclasses.replace(self, **top)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def _field_names(self) -> list[str]:
        """Every name `replace` takes: top-level fields, nested ones flat and dotted."""
        names = [f.name for f in dataclasses.fields(self)]
        for group, cls in (("mbconv", MBConvConfig), ("transformer", TransformerConfig)):
            names += [n for f in dataclasses.fields(cls) for n in (f.name, f"{group}.{f.name}")]
        return names

    @classmethod
    def from_dict(cls, d: dict) -> "CoAtNetConfig":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config field(s): {', '.join(sorted(unknown))}")
        d["mbconv"] = MBConvConfig(**d.get("mbconv", {}))
        d["transformer"] = TransformerConfig(**d.get("transformer", {}))
        for k in ("depths", "widths", "strides"):
            if k in d:
                d[k] = tuple(tuple(v) if isinstance(v, list) else v for v in d[k])
        if isinstance(d.get("img_size"), list):
            d["img_size"] = tuple(d["img_size"])
        return cls(**d)


def _flatten(values) -> list:
    out = []
    for v in values:
        out.extend(v if isinstance(v, (tuple, list)) else [v])
    return out


def nearest_valid(n: int, multiple: int) -> tuple[int, ...]:
    lo = max(multiple, n // multiple * multiple)
    hi = lo if lo >= n else lo + multiple
    return (lo,) if lo == hi or n <= multiple else (lo, hi)


def check_image_size(size: tuple[int, int], multiple: int, what: str = "input size") -> None:
    """Raise ValueError naming the size and the nearest valid ones when a side is not a multiple."""
    h, w = size
    if h % multiple == 0 and w % multiple == 0 and h > 0 and w > 0:
        return
    valid = " or ".join(f"{a}x{b}" for a in nearest_valid(h, multiple) for b in nearest_valid(w, multiple))
    raise ValueError(f"{what} {h}x{w} is not a multiple of {multiple}; nearest valid sizes: {valid}")
