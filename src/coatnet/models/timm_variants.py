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


def _rw(*, family: str, size: str, depths: tuple[int, int, int, int], mbconv: dict | None = None,
        transformer: dict | None = None, pool_type: str = "avg", img_size: int = 224) -> CoAtNetConfig:
    """One of timm's "rw" CoAtNets. `family`: the MBConv defaults (_RW_MBCONV); `size`: the widths of S1..S4
    and the stem's two widths (_WIDTHS, _STEM); `depths`: blocks in S1..S4 (the stem S0 has two convs);
    `mbconv`, `transformer`: the fields that differ from the family's MBConvConfig and from _RW_TRANSFORMER;
    `pool_type`: the pooling of the MBConv stride."""
    stem_hidden, stem_width = _STEM[size]
    return CoAtNetConfig(
        depths=(2, *depths), widths=(stem_width, *_WIDTHS[size]), layout="C-C-T-T",
        mbconv=replace(_RW_MBCONV[family], **(mbconv or {})),
        transformer=replace(_RW_TRANSFORMER, **(transformer or {})),
        stem_hidden_width=stem_hidden, pool_type=pool_type, shortcut_projection="width_change", img_size=img_size)


# One row per timm "rw" model: the keyword arguments of _rw.
RW_VARIANTS: dict[str, dict] = {
    "coatnet_pico_rw_224": dict(family="max", size="nano", depths=(2, 3, 5, 2),
                                mbconv=dict(shortcut_bias=True, project_bias=True)),
    "coatnet_nano_rw_224": dict(family="max", size="nano", depths=(3, 4, 6, 3),
                                mbconv=dict(downsample="pool", shortcut_bias=True, project_bias=True)),
    "coatnet_0_rw_224": dict(family="coat", size="0", depths=(2, 3, 7, 2), mbconv=dict(se_placement="before_norm"),
                             transformer=dict(shortcut_bias=False)),
    "coatnet_1_rw_224": dict(family="coat", size="1", depths=(2, 6, 14, 2),
                             mbconv=dict(downsample="dwconv", se_placement="before_norm"),
                             transformer=dict(shortcut_bias=False)),
    "coatnet_2_rw_224": dict(family="coat", size="2", depths=(2, 6, 14, 2),
                             mbconv=dict(downsample="dwconv", se_activation="silu")),
    "coatnet_3_rw_224": dict(family="coat", size="3", depths=(2, 6, 14, 2),
                             mbconv=dict(downsample="dwconv", se_activation="silu"),
                             transformer=dict(layer_scale=1e-6)),
    "coatnet_bn_0_rw_224": dict(family="coat", size="0", depths=(2, 3, 7, 2),
                                mbconv=dict(downsample="dwconv", se_placement="before_norm"),
                                transformer=dict(shortcut_bias=False, norm="batchnorm")),
    "coatnet_rmlp_nano_rw_224": dict(family="max", size="nano", depths=(3, 4, 6, 3),
                                     mbconv=dict(shortcut_bias=True, project_bias=True),
                                     transformer=dict(relative_bias="mlp", relative_mlp_width=384)),
    "coatnet_rmlp_0_rw_224": dict(family="coat", size="0", depths=(2, 3, 7, 2), mbconv=dict(downsample="dwconv"),
                                  transformer=dict(relative_bias="mlp")),
    # pools with timm's "max" (3x3, stride 2, padding 1) everywhere
    "coatnet_rmlp_1_rw_224": dict(family="coat", size="1", depths=(2, 6, 14, 2),
                                  mbconv=dict(se_placement="before_norm"),
                                  transformer=dict(shortcut_bias=False, relative_bias="mlp", relative_mlp_width=384),
                                  pool_type="max3x3"),
    "coatnet_rmlp_1_rw2_224": dict(family="coat", size="1", depths=(2, 6, 14, 2), mbconv=dict(downsample="dwconv"),
                                   transformer=dict(relative_bias="mlp")),
    "coatnet_rmlp_2_rw_224": dict(family="coat", size="2", depths=(2, 6, 14, 2),
                                  mbconv=dict(downsample="dwconv", se_activation="silu"),
                                  transformer=dict(layer_scale=1e-6, relative_bias="mlp")),
    "coatnet_rmlp_2_rw_384": dict(family="coat", size="2", depths=(2, 6, 14, 2),
                                  mbconv=dict(downsample="dwconv", se_activation="silu"),
                                  transformer=dict(layer_scale=1e-6, relative_bias="mlp"), img_size=384),
    "coatnet_rmlp_3_rw_224": dict(family="coat", size="3", depths=(2, 6, 14, 2),
                                  mbconv=dict(downsample="dwconv", se_activation="silu"),
                                  transformer=dict(layer_scale=1e-6, relative_bias="mlp")),
}


def _describe(name: str) -> str:
    tags = [w for w in WEIGHTS.values() if w.model == name]
    best = max((w for w in tags if w.top1 is not None), key=lambda w: w.top1, default=None)
    weights = (f"weights: {best.tag.split('.')[1]} {best.top1:.1f}% top-1" if best else
               "weights: ImageNet-12k only" if tags else "no published weights")
    return f"timm's {name}; {weights}"


for _name, _row in RW_VARIANTS.items():
    register(_name, _describe(_name))(lambda row=_row: _rw(**row))


# timm's coatnet_nano_cc_224: stages 3 and 4 open with one MBConv block (the stride), then Transformer
# blocks at the same width (timm's block type ('C', 'T')); here split stages "CT" of equal widths.
@register("coatnet_nano_cc_224", "timm's coatnet_nano_cc_224 (C-C-CT-CT); no published weights")
def coatnet_nano_cc_224() -> CoAtNetConfig:
    return _rw(family="coat", size="nano", depths=(3, 4, 6, 3)).replace(
        layout="C-C-CT-CT", depths=(2, 3, 4, (1, 5), (1, 2)), widths=(64, 64, 128, (256, 256), (512, 512)))


def _paper_style(*, depths: tuple[int, int, int, int], widths: tuple[int, int, int, int],
                 stem_width: int) -> CoAtNetConfig:
    """timm's paper-style CoAtNet: blocks and widths of S1..S4, the stem's width."""
    return CoAtNetConfig(
        depths=(2, *depths), widths=(stem_width, *widths), layout="C-C-T-T",
        mbconv=MBConvConfig(downsample="dwconv", se_from="output", se_activation="silu"),
        transformer=TransformerConfig(norm_eps=1e-6, table_resize="geometric"),
        shortcut_projection="width_change", head_hidden=widths[-1], img_size=224)


# One row per timm paper-style model: the keyword arguments of _paper_style.
PAPER_STYLE_VARIANTS: dict[str, dict] = {
    "coatnet_0_224": dict(depths=(2, 3, 5, 2), widths=(96, 192, 384, 768), stem_width=64),
    "coatnet_1_224": dict(depths=(2, 6, 14, 2), widths=(96, 192, 384, 768), stem_width=64),
    "coatnet_2_224": dict(depths=(2, 6, 14, 2), widths=(128, 256, 512, 1024), stem_width=128),
    "coatnet_3_224": dict(depths=(2, 6, 14, 2), widths=(192, 384, 768, 1536), stem_width=192),
    "coatnet_4_224": dict(depths=(2, 12, 28, 2), widths=(192, 384, 768, 1536), stem_width=192),
    "coatnet_5_224": dict(depths=(2, 12, 28, 2), widths=(256, 512, 1280, 2048), stem_width=192),
}
for _name, _row in PAPER_STYLE_VARIANTS.items():
    register(_name, f"timm's paper-style {_name}; no published weights")(lambda row=_row: _paper_style(**row))

TIMM_VARIANTS = tuple(RW_VARIANTS) + ("coatnet_nano_cc_224",) + tuple(PAPER_STYLE_VARIANTS)
