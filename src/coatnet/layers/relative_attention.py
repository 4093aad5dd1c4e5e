"""Relative self-attention over a 2-D feature map (CoAtNet paper, Sec. 2.1, eq. 3).

    y_i = sum_j softmax_j(q_i . k_j / sqrt(d) + w[i - j]) v_j

q, k and v are one linear map (`qkv`) of the tokens of an H x W map; the relative position bias w comes
from a plug-in (position_bias.py: the paper's learned table, or timm's MLP) that gives the (heads, N, N)
bias of a map size. The sum runs in torch's fused scaled_dot_product_attention, w as its additive mask;
`reference_attention` is the equation written out, held equal to it by the tests.
"""
from __future__ import annotations

from typing import Literal, Optional, Tuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .position_bias import RelativePositionMlp, RelativePositionTable

BiasMode = Literal["relative", "relative_post", "none"]


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
                        bias_after_softmax: bool = False) -> torch.Tensor:
    """Eq. 3 written out: q, k, v (B, heads, N, d), bias (heads, N, N) -> (B, heads, N, d).
    `bias_after_softmax` adds the bias to the attention weights instead (the variant the paper rejects)."""
    attn = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, heads, N, N)
    if bias is not None and not bias_after_softmax:
        attn = attn + bias
    attn = attn.softmax(dim=-1)
    if bias is not None and bias_after_softmax:
        attn = attn + bias
    return attn @ v


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
              bias_after_softmax: bool = False, reference: bool = False) -> torch.Tensor:
    """`reference_attention` computed by torch's fused kernel, except when `reference` is asked for, for the
    post-softmax bias (no fused form), for an empty batch, and for a learned bias in bf16 on a CPU."""
    # An empty batch: the fused kernel gives the mask no gradient at all, the reference a zero one (a
    # data-parallel process left without samples must still reduce a gradient for every parameter).
    # A bias that needs a gradient sends torch's CPU dispatcher to its unfused math kernel, which in bf16 runs
    # 1.2-1.7x slower than the equation written out (coatnet_0's S3 and S4 attention, forward and backward,
    # batch 8 and 64, measured on an AVX512-BF16 EPYC; in fp32 the two are within 15%, either way round).
    if (reference or bias_after_softmax or q.shape[0] == 0
            or (bias is not None and bias.requires_grad and q.device.type == "cpu" and q.dtype == torch.bfloat16)):
        return reference_attention(q, k, v, bias, bias_after_softmax)
    # A 4-D mask: with a 3-D one torch's CPU dispatcher falls back to the unfused math kernel.
    mask = None if bias is None else bias.unsqueeze(0)  # (1, heads, N, N)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


torch.fx.wrap("attention")  # a leaf for torch.fx: the kernel it picks depends on the shapes


class RelativeAttention2d(nn.Module):
    """Multi-head self-attention with a relative position bias, on channels-last maps.

    Input (B, H, W, dim_in), output (B, H, W, dim_out); heads = attn_dim // head_dim (attn_dim, the width
    of q, k and v, defaults to dim_out). `bias_mode`: "relative" adds w before the softmax (the paper's
    choice), "relative_post" after it (the variant the paper rejects, Sec. 2.1), "none" is standard
    attention. w comes from `position_bias`: a RelativePositionTable for `feature_size` maps, resized for
    others by `table_resize`, or with `mlp_width` > 0 a RelativePositionMlp. Any map size works;
    `set_feature_size` makes one permanent.
    """

    def __init__(self, dim_in: int, dim_out: int, head_dim: int, feature_size: Tuple[int, int],
                 bias_mode: BiasMode = "relative", qkv_bias: bool = True, attn_dim: Optional[int] = None,
                 mlp_width: int = 0, table_resize: str = "bilinear"):
        super().__init__()
        attn_dim = attn_dim or dim_out  # the paper widens in qkv
        if attn_dim % head_dim:
            raise ValueError(f"head_dim={head_dim} does not divide the attention width {attn_dim}")
        self.num_heads = attn_dim // head_dim
        self.head_dim = head_dim
        self.bias_mode = bias_mode
        self.feature_size = tuple(feature_size)
        # qkv's bias includes a key bias, as timm's does: it adds q_i . b_k to a whole row of logits, which
        # the softmax ignores (ours start at zero; timm's load as they are).
        qkv, proj = nn.Linear(dim_in, 3 * attn_dim, bias=qkv_bias), nn.Linear(attn_dim, dim_out)
        position_bias = None
        if bias_mode != "none":
            position_bias = (RelativePositionMlp(self.num_heads, mlp_width) if mlp_width > 0 else
                             RelativePositionTable(self.num_heads, self.feature_size, table_resize))
        # Made after, registered before the projections: the initial weights and the parameter order (which
        # optimizer states in checkpoints follow) of tables are those of earlier versions.
        self.position_bias = position_bias
        self.qkv, self.proj = qkv, proj

    def bias(self, size: Tuple[int, int]) -> Optional[torch.Tensor]:
        """The (heads, N, N) bias w for an H x W map; None without one."""
        return None if self.position_bias is None else self.position_bias.bias(size)

    def forward(self, x: torch.Tensor, reference: bool = False) -> torch.Tensor:
        """(B, H, W, dim_in) -> (B, H, W, dim_out); `reference`: eq. 3 written out instead of the fused kernel."""
        return self.proj(self.attend(x, reference))

    def attend(self, x: torch.Tensor, reference: bool = False) -> torch.Tensor:
        """Everything but the output projection: (B, H, W, dim_in) -> (B, H, W, attn_dim)."""
        B, H, W, _ = x.shape
        qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        bias = self.bias((H, W))
        bias = None if bias is None else bias.to(q.dtype)  # (heads, N, N)
        out = attention(q, k, v, bias, self.bias_mode == "relative_post", reference)  # (B, heads, N, head_dim)
        return out.transpose(1, 2).reshape(B, H, W, self.num_heads * self.head_dim)

    def set_feature_size(self, size: Tuple[int, int]) -> None:
        """Make H x W the layer's own map size: a table is resized to it (RelativePositionTable.set_size)."""
        self.feature_size = tuple(size)
        if isinstance(self.position_bias, RelativePositionTable):
            self.position_bias.set_size(self.feature_size)
