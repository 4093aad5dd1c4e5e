"""The CoAtNet network (paper, Sec. 3, Fig. 4): stem, four stages, final norm, pooled linear head."""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx
from torch import nn

from ..layers import DropPath, RelativeAttention2d
from .blocks import (BatchNormChannelsLast, MBConvBlock, PatchStem, Stage, Stem, TransformerBlock,
                     drop_path_rates, feature_size, make_norm, to_channels_first, to_channels_last)
from .config import CoAtNetConfig, check_image_size


class CoAtNet(nn.Module):
    """CoAtNet classifier. Input (B, in_chans, H, W) with H and W multiples of `config.reduction`
    (32 for CoAtNet layouts); output logits (B, num_classes), or pooled features when num_classes=0."""

    def __init__(self, config: CoAtNetConfig):
        super().__init__()
        self.config = config.validate()
        cfg = config
        self.in_chans, self.num_classes = cfg.in_chans, cfg.num_classes
        specs = cfg.stage_specs()
        if cfg.is_vit:
            self.stem = PatchStem(cfg.in_chans, specs[0].width, cfg.patch_size)
            in_chs = specs[0].width
        else:
            self.stem = Stem(cfg.in_chans, cfg.widths[0], cfg.depths[0], cfg.stem_stride, cfg.mbconv.norm_eps,
                             cfg.stem_hidden_width, cfg.mbconv.activation)
            in_chs = cfg.widths[0]
        rates = iter(drop_path_rates(sum(s.depth for s in specs), cfg.drop_path_rate))
        stages = []
        for spec in specs:
            blocks = []
            size = feature_size(cfg.image_size, spec.reduction)
            for i in range(spec.depth):
                stride = spec.stride if i == 0 else 1
                if spec.block == "C":
                    blocks.append(MBConvBlock(in_chs, spec.width, stride, cfg.mbconv, cfg.pool_type, next(rates),
                                              cfg.shortcut_projection))
                else:
                    blocks.append(TransformerBlock(in_chs, spec.width, stride, cfg.transformer, cfg.pool_type,
                                                   size, next(rates), cfg.shortcut_projection))
                in_chs = spec.width
            stages.append(Stage(blocks, channels_last=spec.block == "T"))
        self.stages = nn.ModuleList(stages)
        self.stage_reductions = [s.reduction for s in specs]
        self.stage_ends = [s.ends_stage for s in specs]  # False: the first part of a split stage
        self.num_features = in_chs
        # NOTE: the paper does not name a final norm; pre-norm residual streams are never normalised
        # otherwise, so (like ViT and timm) one norm of the last block's type precedes pooling.
        last = specs[-1].block
        final_norm = (make_norm(cfg.transformer.norm, in_chs, cfg.transformer.norm_eps) if last == "T"
                      else BatchNormChannelsLast(in_chs, eps=cfg.mbconv.norm_eps))
        # With a pre-logits layer (timm's paper-style CoAtNets) the final norm acts on the pooled features.
        self.norm = final_norm if not cfg.head_hidden else nn.Identity()
        self.head_norm = final_norm if cfg.head_hidden else None
        self.pre_logits = PreLogits(in_chs, cfg.head_hidden) if cfg.head_hidden else None
        self.head_features = cfg.head_hidden or in_chs
        self.head = nn.Linear(self.head_features, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.apply(_init_weights)
        for stream, m in enumerate(m for m in self.modules() if isinstance(m, DropPath)):
            m.stream = stream  # each stochastic-depth layer draws its own random stream

    # -- the standard surface ----------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor, drop_path_noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, in_chans, H, W) -> normalised last feature map (B, num_features, H/32, W/32).
        `drop_path_noise`: see `forward`."""
        if not torch.jit.is_scripting():  # (TorchScript cannot build the messages)
            check_input(x, self.in_chans, self.config.reduction)
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x, drop_path_noise)
        return to_channels_first(self.norm(to_channels_last(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, C, h, w) feature map -> global average pool [-> norm -> pre-logits layer] -> (B, C) or
        (B, head_hidden) features, or logits (B, num_classes)."""
        if self.pre_logits is not None:
            x = self.pre_logits(self.head_norm(x.mean((2, 3), keepdim=True).permute(0, 2, 3, 1)).flatten(1))
        else:
            x = x.mean((2, 3))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor, drop_path_noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, in_chans, H, W) -> logits (B, num_classes). In training, `drop_path_noise` (B, L) uniforms in
        [0, 1) decide stochastic depth: DropPath layer `stream` keeps sample b where column `stream` of row b
        is below its keep rate (L = layers.drop_path_streams(model); None: torch's generator decides)."""
        return self.forward_head(self.forward_features(x, drop_path_noise))

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps (B, C, H/r, W/r) after the stem and after each stage S1..S4, r = 2, 4, 8, 16, 32 for
        the paper's strides (a split stage reports once, after its Transformer part); the last is normalised."""
        check_input(x, self.in_chans, self.config.reduction)
        x = self.stem(x)
        maps = [] if self.config.is_vit else [x]
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i + 1 == len(self.stages):
                x = to_channels_first(self.norm(to_channels_last(x)))
            if self.stage_ends[i]:
                maps.append(x)
        return maps

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.config = self.config.replace(num_classes=num_classes)
        self.head = nn.Linear(self.head_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            _init_weights(self.head)
            self.head.to(next(self.parameters()).device)

    def no_weight_decay(self) -> set[str]:
        """Names of parameters to exclude from weight decay: bias tables (and the MLPs that replace them),
        norm weights, all biases."""
        return {name for name, p in self.named_parameters() if p.ndim <= 1 or ".position_bias." in name}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def set_input_size(self, img_size: int | tuple[int, int]) -> None:
        """Resize every relative-position table (bilinearly) to the maps of a new input size."""
        cfg = self.config.replace(img_size=img_size)
        check_image_size(cfg.image_size, cfg.reduction, what="img_size")
        self.config = cfg
        for stage, reduction in zip(self.stages, self.stage_reductions):
            for m in stage.modules():
                if isinstance(m, RelativeAttention2d):
                    m.set_feature_size(feature_size(cfg.image_size, reduction))


def check_input(x: torch.Tensor, in_chans: int, reduction: int) -> None:
    """Raise ValueError, naming what is wrong and what would fit, unless x is (B, in_chans, H, W) with H and
    W multiples of `reduction`."""
    if x.ndim != 4:
        raise ValueError(f"expected a (B, C, H, W) image batch, got a tensor of shape {tuple(x.shape)}")
    if x.shape[1] != in_chans:
        raise ValueError(f"expected {in_chans} input channels, got {x.shape[1]} "
                         f"(build the model with in_chans={x.shape[1]} to accept them)")
    check_image_size(tuple(x.shape[-2:]), reduction)


torch.fx.wrap("check_input")  # a leaf for torch.fx, which knows the shapes only as proxies


class PreLogits(nn.Module):
    """The pre-logits layer of timm's paper-style CoAtNets: (B, C) -> tanh(linear) -> (B, hidden)."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc = nn.Linear(width, hidden)
        self.act = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x))


def _init_weights(m: nn.Module) -> None:
    # Truncated-normal linears as in ViT; convolutions keep PyTorch's fan-in default.
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
