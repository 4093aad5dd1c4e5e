"""timm's CoAtNet variants (timm 1.0, models/maxxvit.py), expressed exactly in our config.

Two families:
- "rw" models (Ross Wightman's own configs, trained before the paper's code was public): SiLU MBConv,
  expansion and squeeze-excite from the input/expanded width, attention widened in the output projection,
  a stem of two widths, projections only where the width changes; some use pooling for the MBConv stride,
  a pre-norm activation, squeeze-excite before norm2, BatchNorm in the Transformer, an MLP relative
  bias ("rmlp"), layer scale.
- paper-style `coatnet_N_224` (timm's reading of the paper, untrained in timm): GELU, stride in the
  depthwise conv, squeeze-excite from the output width with SiLU, and a tanh pre-logits head.
Weight names map onto ours in timm_import.py; the weights themselves are listed in pretrained.py.
"""
from __future__ import annotations

from dataclasses import replace

from .config import CoAtNetConfig, MBConvConfig, TransformerConfig
from .pretrained import WEIGHTS
from .variants import register

# timm's MaxxVit families share these. "max" (timm's _rw_max_cfg) and "coat" (its _rw_coat_cfg).
_RW_COMMON = dict(expand_from="input", se_from="expanded", activation="silu", project_bias=False,
                  shortcut_bias=False)
_RW_MBCONV = {
    "max": MBConvConfig(**_RW_COMMON, downsample="dwconv", se_activation="silu"),
    "coat": MBConvConfig(**_RW_COMMON, downsample="pool", se_activation="relu", pre_norm_act=True),
}
_RW_TRANSFORMER = TransformerConfig(widen_in="proj", norm_eps=1e-6, table_resize="geometric")
_WIDTHS = {
    "nano": (64, 128, 256, 512), "0": (96, 192, 384, 768), "1": (96, 192, 384, 768),
    "2": (128, 256, 512, 1024), "3": (192, 384, 768, 1536),
}
_STEM = {"nano": (32, 64), "0": (32, 64), "1": (32, 64), "2": (64, 128), "3": (96, 192)}

# name: (family, size, depths S1..S4, MBConv overrides, Transformer overrides, img_size)
RW_VARIANTS: dict[str, tuple] = {
    "coatnet_pico_rw_224": ("max", "nano", (2, 3, 5, 2), dict(shortcut_bias=True, project_bias=True), {}, 224),
    "coatnet_nano_rw_224": ("max", "nano", (3, 4, 6, 3),
                            dict(downsample="pool", shortcut_bias=True, project_bias=True), {}, 224),
    "coatnet_0_rw_224": ("coat", "0", (2, 3, 7, 2), dict(se_placement="before_norm"),
                         dict(shortcut_bias=False), 224),
    "coatnet_1_rw_224": ("coat", "1", (2, 6, 14, 2), dict(downsample="dwconv", se_placement="before_norm"),
                         dict(shortcut_bias=False), 224),
    "coatnet_2_rw_224": ("coat", "2", (2, 6, 14, 2), dict(downsample="dwconv", se_activation="silu"), {}, 224),
    "coatnet_3_rw_224": ("coat", "3", (2, 6, 14, 2), dict(downsample="dwconv", se_activation="silu"),
                         dict(layer_scale=1e-6), 224),
    "coatnet_bn_0_rw_224": ("coat", "0", (2, 3, 7, 2), dict(downsample="dwconv", se_placement="before_norm"),
                            dict(shortcut_bias=False, norm="batchnorm"), 224),
    "coatnet_rmlp_nano_rw_224": ("max", "nano", (3, 4, 6, 3), dict(shortcut_bias=True, project_bias=True),
                                 dict(relative_bias="mlp", relative_mlp_width=384), 224),
    "coatnet_rmlp_0_rw_224": ("coat", "0", (2, 3, 7, 2), dict(downsample="dwconv"),
                              dict(relative_bias="mlp"), 224),
    "coatnet_rmlp_1_rw_224": ("coat", "1", (2, 6, 14, 2), dict(se_placement="before_norm"),
                              dict(shortcut_bias=False, relative_bias="mlp", relative_mlp_width=384), 224),
    "coatnet_rmlp_1_rw2_224": ("coat", "1", (2, 6, 14, 2), dict(downsample="dwconv"),
                               dict(relative_bias="mlp"), 224),
    "coatnet_rmlp_2_rw_224": ("coat", "2", (2, 6, 14, 2), dict(downsample="dwconv", se_activation="silu"),
                              dict(layer_scale=1e-6, relative_bias="mlp"), 224),
    "coatnet_rmlp_2_rw_384": ("coat", "2", (2, 6, 14, 2), dict(downsample="dwconv", se_activation="silu"),
                              dict(layer_scale=1e-6, relative_bias="mlp"), 384),
    "coatnet_rmlp_3_rw_224": ("coat", "3", (2, 6, 14, 2), dict(downsample="dwconv", se_activation="silu"),
                              dict(layer_scale=1e-6, relative_bias="mlp"), 224),
}
# coatnet_rmlp_1_rw_224 pools with timm's "max" (3x3, stride 2, padding 1) everywhere.
_POOL = {"coatnet_rmlp_1_rw_224": "max3x3"}


def _rw(name: str, family: str, size: str, depths: tuple, mb: dict, tr: dict, img_size: int) -> CoAtNetConfig:
    stem_hidden, stem_width = _STEM[size]
    return CoAtNetConfig(
        depths=(2, *depths), widths=(stem_width, *_WIDTHS[size]), layout="C-C-T-T",
        mbconv=replace(_RW_MBCONV[family], **mb), transformer=replace(_RW_TRANSFORMER, **tr),
        stem_hidden_width=stem_hidden, pool_type=_POOL.get(name, "avg"), shortcut_projection="width_change",
        img_size=img_size)


def _describe(name: str) -> str:
    tags = [w for w in WEIGHTS.values() if w.model == name]
    best = max((w for w in tags if w.top1 is not None), key=lambda w: w.top1, default=None)
    weights = (f"weights: {best.tag.split('.')[1]} {best.top1:.1f}% top-1" if best else
               "weights: ImageNet-12k only" if tags else "no published weights")
    return f"timm's {name}; {weights}"


for _name, _spec in RW_VARIANTS.items():
    register(_name, _describe(_name))(lambda n=_name, s=_spec: _rw(n, *s))


# timm's coatnet_nano_cc_224: stages 3 and 4 open with one MBConv block (the stride), then Transformer
# blocks at the same width (timm's block type ('C', 'T')); here split stages "CT" of equal widths.
@register("coatnet_nano_cc_224", "timm's coatnet_nano_cc_224 (C-C-CT-CT); no published weights")
def coatnet_nano_cc_224() -> CoAtNetConfig:
    return _rw("coatnet_nano_cc_224", "coat", "nano", (3, 4, 6, 3), {}, {}, 224).replace(
        layout="C-C-CT-CT", depths=(2, 3, 4, (1, 5), (1, 2)), widths=(64, 64, 128, (256, 256), (512, 512)))


# timm's paper-style configs: name: (depths S1..S4, widths S1..S4, stem width)
PAPER_STYLE_VARIANTS: dict[str, tuple] = {
    "coatnet_0_224": ((2, 3, 5, 2), (96, 192, 384, 768), 64),
    "coatnet_1_224": ((2, 6, 14, 2), (96, 192, 384, 768), 64),
    "coatnet_2_224": ((2, 6, 14, 2), (128, 256, 512, 1024), 128),
    "coatnet_3_224": ((2, 6, 14, 2), (192, 384, 768, 1536), 192),
    "coatnet_4_224": ((2, 12, 28, 2), (192, 384, 768, 1536), 192),
    "coatnet_5_224": ((2, 12, 28, 2), (256, 512, 1280, 2048), 192),
}


def _paper_style(depths: tuple, widths: tuple, stem: int) -> CoAtNetConfig:
    return CoAtNetConfig(
        depths=(2, *depths), widths=(stem, *widths), layout="C-C-T-T",
        mbconv=MBConvConfig(downsample="dwconv", se_from="output", se_activation="silu"),
        transformer=TransformerConfig(norm_eps=1e-6, table_resize="geometric"),
        shortcut_projection="width_change", head_hidden=widths[-1], img_size=224)


for _name, _spec in PAPER_STYLE_VARIANTS.items():
    register(_name, f"timm's paper-style {_name}; no published weights")(
        lambda s=_spec: _paper_style(*s))

TIMM_VARIANTS = tuple(RW_VARIANTS) + ("coatnet_nano_cc_224",) + tuple(PAPER_STYLE_VARIANTS)
