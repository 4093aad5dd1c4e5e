"""Named variants and the model registry.

Each paper variant is one row of Table 3 of the paper (arXiv 2106.04803v2): depths and widths of
S0..S4 and the attention head size. Parameter and multiply-add counts are held to the paper's by tests.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Sequence

from torch import nn

from ..utils import did_you_mean
from .coatnet import CoAtNet
from .config import CoAtNetConfig, TransformerConfig
from .features import CoAtNetFeatures
from .hub import (hub_weights_file, is_hub_id, is_ours, load_hub_model, read_hub_config, resolve_hub_folder,
                  timm_folder_model)
from .pretrained import default_tag, get_weights, missing_weights, resolve_pretrained, split_model_name, weights_of
from .weights import checkpoint_in_chans, checkpoint_num_classes, load_state, read_weights

_REGISTRY: dict[str, Callable[[], CoAtNetConfig]] = {}
_DOCS: dict[str, str] = {}


def register(name: str, doc: str = "") -> Callable:
    def wrap(fn: Callable[[], CoAtNetConfig]) -> Callable[[], CoAtNetConfig]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = fn
        _DOCS[name] = doc
        return fn
    return wrap


def _paper(depths, widths, head_dim, layout="C-C-T-T") -> Callable[[], CoAtNetConfig]:
    return lambda: CoAtNetConfig(depths=depths, widths=widths, layout=layout,
                                 transformer=TransformerConfig(head_dim=head_dim))


# name: (depths S0..S4, widths S0..S4, head_dim, layout)        paper Table 3
PAPER_VARIANTS: dict[str, tuple] = {
    "coatnet_0": ((2, 2, 3, 5, 2), (64, 96, 192, 384, 768), 32, "C-C-T-T"),
    "coatnet_1": ((2, 2, 6, 14, 2), (64, 96, 192, 384, 768), 32, "C-C-T-T"),
    "coatnet_2": ((2, 2, 6, 14, 2), (128, 128, 256, 512, 1024), 32, "C-C-T-T"),
    "coatnet_3": ((2, 2, 6, 14, 2), (192, 192, 384, 768, 1536), 32, "C-C-T-T"),
    "coatnet_4": ((2, 2, 12, 28, 2), (192, 192, 384, 768, 1536), 32, "C-C-T-T"),
    "coatnet_5": ((2, 2, 12, 28, 2), (192, 256, 512, 1280, 2048), 64, "C-C-T-T"),
    # S3 split: 8 MBConv blocks at stride 2, then 42 Transformer blocks at stride 1 and double width.
    "coatnet_6": ((2, 2, 4, (8, 42), 2), (192, 192, 384, (768, 1536), 2048), 128, "C-C-CT-T"),
    "coatnet_7": ((2, 2, 4, (8, 42), 2), (192, 256, 512, (1024, 2048), 3072), 128, "C-C-CT-T"),
}
for _name, (_d, _w, _h, _l) in PAPER_VARIANTS.items():
    register(_name, f"paper Table 3: depths {_d}, widths {_w}, head_dim {_h}")(_paper(_d, _w, _h, _l))


@register("coatnet_pico", "small preset for 32-64 px images and CPUs (5.3M parameters and 0.83 GMACs at 224 "
                          "with 3 channels and 1,000 classes; 4.9M with 1 and 10)")
def coatnet_pico() -> CoAtNetConfig:
    # Half of CoAtNet-0's widths and fewer blocks; NOTE: not a paper variant.
    return CoAtNetConfig(depths=(2, 2, 2, 3, 2), widths=(32, 48, 96, 192, 384), layout="C-C-T-T",
                         transformer=TransformerConfig(head_dim=32), img_size=64)


@register("coatnet_nano", "tiny preset for 32 px images on CPUs, one block per stage (0.96M parameters with 1 "
                          "channel and 10 classes; 1.2M with 3 and 1,000)")
def coatnet_nano() -> CoAtNetConfig:
    # One block per stage at a third of CoAtNet-0's widths: the full C-C-T-T layout, trainable on 2 CPU
    # cores in minutes. NOTE: not a paper variant; its Transformer blocks use BatchNorm (the paper's
    # Table 8 ablation, "similar accuracy"): at this size and budget it learns much faster than LayerNorm
    # (docs/results/norms.md; 82.9% vs 80.2% test top-1 after 32k Fashion-MNIST images).
    return CoAtNetConfig(depths=(1, 1, 1, 1, 1), widths=(32, 32, 64, 128, 256), layout="C-C-T-T",
                         transformer=TransformerConfig(head_dim=32, norm="batchnorm"), img_size=32)


@register("coatnet_micro", "the Fashion-MNIST default: 32 px, both Transformer stages attend over 4x4 maps "
                          "(0.48M parameters with 1 channel and 10 classes, 0.61M with 3 and 1,000, at 32 px)")
def coatnet_micro() -> CoAtNetConfig:
    # NOTE: not a paper variant. At 32 px the paper's strides leave S3 a 2x2 map and S4 a single token, where
    # relative attention has nothing to attend over; here S3 and S4 keep S2's 4x4 map (stride 1: 16 tokens,
    # 7x7 relative offsets per head), and S2 has two MBConv blocks (measured: +1.0 points after one epoch,
    # docs/results/fashion-mnist.md). BatchNorm in the Transformer blocks, as in coatnet_nano.
    return CoAtNetConfig(depths=(2, 1, 2, 1, 1), widths=(32, 32, 64, 128, 128), strides=(2, 2, 1, 1),
                         layout="C-C-T-T", transformer=TransformerConfig(head_dim=32, norm="batchnorm"), img_size=32)


@register("coatnet_mini", "coatnet_micro's shape, wider and deeper, S1 at half the input size: the long "
                          "Fashion-MNIST recipe's model (1.55M parameters with 1 channel and 10 classes, "
                          "1.7M with 3 and 1,000, at 32 px)")
def coatnet_mini() -> CoAtNetConfig:
    # NOTE: not a paper variant. For 28-32 px images: S1 keeps the stem's 16x16 map (stride 1), S2 halves it
    # to 8x8 and the Transformer stages S3 and S4 attend over 4x4 maps, at 1.5x coatnet_micro's widths with
    # two blocks per stage. BatchNorm in the Transformer blocks, as in coatnet_micro.
    return CoAtNetConfig(depths=(2, 2, 2, 2, 1), widths=(48, 48, 96, 192, 192), strides=(1, 2, 2, 1),
                         layout="C-C-T-T", transformer=TransformerConfig(head_dim=32, norm="batchnorm"), img_size=32)


@register("coatnet_mini_wide", "coatnet_mini at twice its widths (6.1M parameters with 1 channel and 10 classes, "
                              "at 32 px): a wider model for the long Fashion-MNIST recipe")
def coatnet_mini_wide() -> CoAtNetConfig:
    # NOTE: not a paper variant. 4x coatnet_mini's multiply-adds for 2.15x its training time on a 2-core AMX Xeon
    # in bf16 (240 against 516 img/s, batch 128 at 32 px): wider matrices use the CPU better.
    return coatnet_mini().replace(widths=(96, 96, 192, 384, 384))


@register("coatnet_mini_deep", "coatnet_mini with CoAtNet-0's Transformer depths, 5 blocks in S3 and 2 in S4 "
                              "(3.3M parameters with 1 channel and 10 classes, at 32 px)")
def coatnet_mini_deep() -> CoAtNetConfig:
    # NOTE: not a paper variant. The extra blocks attend over 4x4 maps, where matrix products run well on a CPU:
    # 2.15x coatnet_mini's parameters and 1.63x its multiply-adds for 1.19x its training time on a 2-core AMX
    # Xeon in bf16 (562 against 669 img/s, batch 128 at 32 px, `coatnet bench --train --channels-last`).
    return coatnet_mini().replace(depths=(2, 2, 2, 5, 2))


@register("coatnet_nano_ln", "coatnet_nano with LayerNorm in its Transformer blocks (the paper's norm)")
def coatnet_nano_ln() -> CoAtNetConfig:
    return coatnet_nano().replace(norm="layernorm")


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_REGISTRY)


def describe_model(name: str) -> str:
    return _DOCS.get(name, "")


def get_config(name: str, **overrides: Any) -> CoAtNetConfig:
    """The named variant's config with overrides applied (None overrides ignored), validated. timm's
    "<model>.<tag>" names are accepted: the tag sets the class count of its head unless overridden."""
    name, tag = split_model_name(name)
    if name not in _REGISTRY:
        hint = did_you_mean(name, list_models())  # "; did you mean 'x'?" or ""
        raise ValueError(f"unknown model {name!r}{hint or ';'} available: {', '.join(list_models())}")
    if tag is not None and overrides.get("num_classes") is None:
        overrides["num_classes"] = get_weights(tag).num_classes
    return _REGISTRY[name]().replace(**overrides).validate()


def create_model(name: str | None = None, pretrained: str | os.PathLike | bool | None = None,
                 features_only: bool = False, out_indices: Sequence[int] | None = None, **overrides: Any) -> nn.Module:
    """Build a registered variant. `overrides` replace config fields (flat or dotted names; None is
    ignored). `pretrained`: a weights file to load (ours, or timm's .safetensors/.pth/.bin); a tag from
    `coatnet weights` (found in our weights folder after `coatnet download TAG`, or in the Hugging Face
    cache where timm keeps what it downloads; never fetched here); or True for the tag in `name`
    ("coatnet_0_rw_224.sw_in1k") or else the model's default tag, as in timm. Without a num_classes
    (in_chans) override the model takes the checkpoint's class count (input channels); another in_chans
    adapts the stem's first convolution as timm does; with another one the checkpoint's classifier
    is dropped with a message. Relative-position tables are resized to img_size.

    `pretrained` may also be a Hub-format folder (`coatnet save-pretrained`) or "hf-hub:user/name" (the
    Hugging Face cache, else a download with huggingface_hub), and `name` may then be left out: the folder's
    config.json gives the network, its in_chans, num_classes and img_size unless overridden (a new head is
    initialised, the stem's first convolution adapted to other input channels). "hf-hub:user/name" may
    also be given as `name`, as in timm.

    `features_only=True` returns the backbone instead (models/features.py, timm's convention): a module
    whose forward gives the maps at `out_indices` (0: stem, stride 2; 1..4: S1..S4, strides 4..32;
    default all) and whose `feature_info` tells their channels, reductions and module names."""
    if name is not None and is_hub_id(name):  # timm's create_model("hf-hub:user/name")
        if pretrained not in (None, True, False):
            raise ValueError(f"{name} names the weights already; drop pretrained={pretrained!r}")
        name, pretrained = None, name
    if features_only:
        model = create_model(name, pretrained, **overrides)
        return CoAtNetFeatures(model, (0, 1, 2, 3, 4) if out_indices is None else out_indices)
    if out_indices is not None:
        raise ValueError("out_indices applies with features_only=True")
    folder = resolve_hub_folder(pretrained) if pretrained not in (None, True, False) else None
    if folder is not None:
        config = read_hub_config(folder)
        if not is_ours(config):  # timm's folder: its architecture, from its weights file
            arch, overrides = timm_folder_model(folder, config, name, overrides)
            return create_model(arch, pretrained=hub_weights_file(folder), **overrides)
        if config.get("architecture") is not None:
            get_config(config["architecture"])  # an architecture this version does not know: named now
        return load_hub_model(folder, config, name, overrides)
    if name is None:
        if isinstance(pretrained, (str, os.PathLike)) and not os.path.exists(pretrained) and not weights_of(pretrained):
            raise missing_weights(pretrained)  # a mistyped folder or file, not a missing model name
        raise ValueError("create_model needs a model name, or pretrained= a Hub-format folder or 'hf-hub:user/name'")
    model_name, tag = split_model_name(name)
    if pretrained is True:
        pretrained = tag or default_tag(model_name)
        if pretrained is None:
            raise ValueError(f"{model_name} has no published weights (`coatnet weights` lists them); "
                             f"pass a weights file as pretrained=")
    if pretrained is None or pretrained is False:
        return CoAtNet(get_config(name, **overrides))
    path = resolve_pretrained(pretrained)
    state = read_weights(path)
    if overrides.get("num_classes") is None and checkpoint_num_classes(state) is not None:
        overrides["num_classes"] = checkpoint_num_classes(state)
    if overrides.get("in_chans") is None and checkpoint_in_chans(state) is not None:
        overrides["in_chans"] = checkpoint_in_chans(state)  # another in_chans adapts the stem (load_state)
    model = CoAtNet(get_config(model_name, **overrides))
    load_state(model, state, path)
    return model
