"""The blocks of CoAtNet (paper, Sec. 2 and eq. 4-5): stem, MBConv, Transformer, and their stages.

Every block is pre-norm, x <- x + f(norm(x)). The first block of a stage may halve the resolution; its
shortcut is then Proj(Pool(x)) and its residual branch sees the strided input.
MBConv stages work on (B, C, H, W); Transformer stages on channels-last (B, H, W, C) views of the same
memory, so moving between them costs no copy.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..layers import DropPath, LayerScale, RelativeAttention2d, SqueezeExcite
from .config import MBConvConfig, TransformerConfig

ACTIVATION_LAYERS = {"gelu": nn.GELU, "silu": nn.SiLU, "relu": nn.ReLU}


def pool2x2(x: torch.Tensor, pool_type: str) -> torch.Tensor:
    """Stride-2 pooling of a (B, C, H, W) map: 2x2 "avg" or "max", or "max3x3" (3x3, padding 1)."""
    if pool_type == "max3x3":
        return F.max_pool2d(x, 3, 2, 1)
    return F.max_pool2d(x, 2) if pool_type == "max" else F.avg_pool2d(x, 2)


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1)  # (B, C, H, W) -> (B, H, W, C), a view


def to_channels_first(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W), a view


class BatchNormChannelsLast(nn.BatchNorm2d):
    """BatchNorm over the last axis of (B, H, W, C): the paper's BatchNorm-in-Transformer ablation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # nn.BatchNorm2d.forward on the channels-first view, written out: TorchScript has no super().
        x = to_channels_first(x)
        if self.training and x.numel() == x.shape[1] and self.running_mean is not None:
            # One value per channel (a batch of one image on a 1x1 map, as in the last stage at 32 px):
            # batch statistics do not exist, so normalise with the running ones and leave them unchanged.
            return to_channels_last(F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                                 False, 0.0, self.eps))
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # a cumulative moving average
                momentum = 1.0 / float(self.num_batches_tracked)
        batch_statistics = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats  # otherwise the running statistics stay
        return to_channels_last(F.batch_norm(x, self.running_mean if track else None,
                                             self.running_var if track else None, self.weight, self.bias,
                                             batch_statistics, momentum, self.eps))


class Stem(nn.Module):
    """S0: `depth` 3x3 convolutions, the first strided; BatchNorm + activation between them. All but
    the last have `hidden_width` channels (default: `width`)."""

    def __init__(self, in_chans: int, width: int, depth: int, stride: int, norm_eps: float = 1e-5,
                 hidden_width: int = 0, activation: str = "gelu"):
        super().__init__()
        hidden_width = hidden_width or width
        layers: list[nn.Module] = []
        for i in range(depth):
            out = width if i == depth - 1 else hidden_width
            # No conv bias: the next block's pre-norm BatchNorm would cancel it.
            layers.append(nn.Conv2d(in_chans if i == 0 else hidden_width, out, 3, stride if i == 0 else 1, 1,
                                    bias=False))
            if i < depth - 1:
                layers += [nn.BatchNorm2d(hidden_width, eps=norm_eps), ACTIVATION_LAYERS[activation]()]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class PatchStem(nn.Module):
    """ViT-Rel's stem: non-overlapping patch_size x patch_size patches, linearly embedded."""

    def __init__(self, in_chans: int, width: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, width, patch_size, patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def needs_projection(in_chs: int, out_chs: int, stride: int, rule: str = "strided") -> bool:
    """Whether a block's shortcut gets a 1x1 projection (config field `shortcut_projection`)."""
    return in_chs != out_chs or (stride > 1 and rule == "strided")


class MBConvBlock(nn.Module):
    """Pre-norm inverted bottleneck: 1x1 expand, depthwise kxk, squeeze-excite, 1x1 project (eq. 5).

    (B, C_in, H, W) -> (B, C_out, H/stride, W/stride). `shortcut_projection` as in CoAtNetConfig.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int, cfg: MBConvConfig, pool_type: str,
                 drop_path: float = 0.0, shortcut_projection: str = "strided"):
        super().__init__()
        self.stride, self.pool_type = stride, pool_type
        self.shortcut = (nn.Conv2d(in_chs, out_chs, 1, bias=cfg.shortcut_bias)
                         if needs_projection(in_chs, out_chs, stride, shortcut_projection) else None)
        hidden = int(round((in_chs if cfg.expand_from == "input" else out_chs) * cfg.expand_ratio))
        conv_stride = stride if cfg.downsample == "conv1x1" else 1
        dw_stride = stride if cfg.downsample == "dwconv" else 1
        self.pool_input = stride > 1 and cfg.downsample == "pool"
        self.act = ACTIVATION_LAYERS[cfg.activation]()
        self.pre_norm = nn.BatchNorm2d(in_chs, eps=cfg.norm_eps)
        self.pre_act = self.act if cfg.pre_norm_act else nn.Identity()
        self.conv1 = nn.Conv2d(in_chs, hidden, 1, conv_stride, bias=False)
        self.norm1 = nn.BatchNorm2d(hidden, eps=cfg.norm_eps)
        self.conv2 = nn.Conv2d(hidden, hidden, cfg.kernel_size, dw_stride, cfg.kernel_size // 2, groups=hidden,
                               bias=False)
        self.norm2 = nn.BatchNorm2d(hidden, eps=cfg.norm_eps)
        se_base = {"input": in_chs, "output": out_chs, "expanded": hidden}[cfg.se_from]
        se_width = int(round(se_base * cfg.se_ratio))
        self.se = (SqueezeExcite(hidden, se_width, ACTIVATION_LAYERS[cfg.se_activation]) if se_width > 0
                   else nn.Identity())
        self.se_before_norm = cfg.se_placement == "before_norm"
        self.conv3 = nn.Conv2d(hidden, out_chs, 1, bias=cfg.project_bias)
        self.drop_path = DropPath(drop_path)

    def _shortcut(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C_out, H', W'): Proj(Pool(x)) when it downsamples, x otherwise (the
        projection, if any, also when only the width changes)."""
        if self.stride > 1:
            x = pool2x2(x, self.pool_type)
        return self.shortcut(x) if self.shortcut is not None else x

    def forward(self, x: torch.Tensor, drop_path_noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`drop_path_noise`: the model's stochastic-depth uniforms (B, L), see layers/drop_path.py."""
        shortcut = self._shortcut(x)
        x = self.pre_act(self.pre_norm(x))
        if self.pool_input:  # always 2x2 average, whatever the shortcut's pooling (as timm)
            x = F.avg_pool2d(x, 2)
        x = self.act(self.norm1(self.conv1(x)))
        x = self.conv2(x)
        if self.se_before_norm:
            x = self.act(self.norm2(self.se(x)))
        else:
            x = self.se(self.act(self.norm2(x)))
        x = self.conv3(x)
        return shortcut + self.drop_path(x, drop_path_noise)


class Mlp(nn.Module):
    """The Transformer's feed-forward network on channels-last input."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def make_norm(kind: str, width: int, eps: float) -> nn.Module:
    return nn.LayerNorm(width, eps=eps) if kind == "layernorm" else BatchNormChannelsLast(width, eps=eps)


class TransformerBlock(nn.Module):
    """Pre-norm relative-attention block with FFN (eq. 4), on channels-last (B, H, W, C) maps.

    Downsampling (stride 2): x <- Proj(Pool(x)) + Attention(Pool(Norm(x))). `feature_size` is the output
    map's (H, W): it sizes the relative-position table. With layer scale, each branch is scaled per channel.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int, cfg: TransformerConfig, pool_type: str,
                 feature_size: tuple[int, int], drop_path: float = 0.0, shortcut_projection: str = "strided"):
        super().__init__()
        self.stride, self.pool_type = stride, pool_type
        self.shortcut = (nn.Linear(in_chs, out_chs, bias=cfg.shortcut_bias)
                         if needs_projection(in_chs, out_chs, stride, shortcut_projection) else None)
        self.norm1 = make_norm(cfg.norm, in_chs, cfg.norm_eps)
        self.attn = RelativeAttention2d(
            in_chs, out_chs, cfg.head_dim, feature_size, cfg.attention_bias,
            attn_dim=in_chs if cfg.widen_in == "proj" else out_chs,
            mlp_width=cfg.relative_mlp_width if cfg.relative_bias == "mlp" else 0, table_resize=cfg.table_resize)
        self.ls1 = LayerScale(out_chs, cfg.layer_scale) if cfg.layer_scale > 0 else nn.Identity()
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = make_norm(cfg.norm, out_chs, cfg.norm_eps)
        self.mlp = Mlp(out_chs, int(round(out_chs * cfg.mlp_ratio)))
        self.ls2 = LayerScale(out_chs, cfg.layer_scale) if cfg.layer_scale > 0 else nn.Identity()
        self.drop_path2 = DropPath(drop_path)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H/stride, W/stride, C)."""
        return to_channels_last(pool2x2(to_channels_first(x), self.pool_type)) if self.stride > 1 else x

    def _shortcut(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C_in) -> (B, H', W', C_out): Proj(Pool(x)), each where the block has it."""
        shortcut = self._pool(x)
        return self.shortcut(shortcut) if self.shortcut is not None else shortcut

    def forward(self, x: torch.Tensor, drop_path_noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        shortcut = self._shortcut(x)
        x = shortcut + self.drop_path1(self.ls1(self.attn(self._pool(self.norm1(x)))), drop_path_noise)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))), drop_path_noise)


class Stage(nn.Module):
    """A run of blocks of one type. Takes and returns (B, C, H, W); Transformer stages work on a
    channels-last view inside."""

    def __init__(self, blocks: list[nn.Module], channels_last: bool):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.channels_last = channels_last
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, drop_path_noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`drop_path_noise` (B, L) goes to every block (training; the blocks of `inference_model` take none)."""
        if self.channels_last:
            x = to_channels_last(x)
        for block in self.blocks:
            if not torch.jit.is_scripting():  # TorchScript cannot checkpoint
                if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                    x = (checkpoint(block, x, use_reentrant=False) if drop_path_noise is None
                         else checkpoint(block, x, drop_path_noise, use_reentrant=False))
                    continue
            x = block(x) if drop_path_noise is None else block(x, drop_path_noise)
        return to_channels_first(x) if self.channels_last else x


def drop_path_rates(total_blocks: int, max_rate: float) -> list[float]:
    """Stochastic depth rising linearly from 0 at the first block to max_rate at the last."""
    if total_blocks <= 1:
        return [max_rate] * total_blocks
    return [max_rate * i / (total_blocks - 1) for i in range(total_blocks)]


def feature_size(image_size: tuple[int, int], reduction: int) -> tuple[int, int]:
    return (math.ceil(image_size[0] / reduction), math.ceil(image_size[1] / reduction))
