"""Relative self-attention over a 2-D feature map (CoAtNet paper, Sec. 2.1, eq. 3).

    y_i = sum_j softmax_j(q_i . k_j / sqrt(d) + w[i - j]) v_j

`w` is a learned, input-independent table with one entry per 2-D offset (dy, dx) and per head: for an
H x W map the offsets span (2H-1) x (2W-1). It is stored as a (heads, 2H-1, 2W-1) grid so that moving to
another resolution is a bilinear resize of that grid (paper, Sec. 4: fine-tuning at 384/512).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .bf16_cpu import Linear, linear
from .relative_position_mlp import RelativePositionMlp
from .table_resize import resize_table

BiasMode = Literal["relative", "relative_post", "none"]


def relative_position_index(height: int, width: int, device=None) -> torch.Tensor:
    """(H*W, H*W) index into a flattened (2H-1, 2W-1) table: entry [i, j] encodes the offset i - j."""
    ys, xs = torch.meshgrid(
        torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij"
    )
    coords = torch.stack([ys.flatten(), xs.flatten()])  # (2, N)
    offsets = coords[:, :, None] - coords[:, None, :]  # (2, N, N), each in [-(size-1), size-1]
    # Row stride is the table's width 2W-1, so distinct offsets never share an entry.
    return (offsets[0] + height - 1) * (2 * width - 1) + (offsets[1] + width - 1)


def resize_bias_table(table: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Resize a (heads, 2H-1, 2W-1) table to the offsets of an H' x W' map (see table_resize.py)."""
    return resize_table(table, size, mode)


def gather_bias(table: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """The (heads, N, N) additive bias for an H x W map, resizing the table when its grid differs."""
    table = resize_bias_table(table, size, mode)
    index = relative_position_index(*size, device=table.device)
    return table.flatten(1)[:, index]  # (heads, N, N)


class RelativeAttention2d(nn.Module):
    """Multi-head self-attention with a relative position bias, on channels-last maps.

    Input (B, H, W, dim_in), output (B, H, W, dim_out); heads = attn_dim // head_dim. `feature_size` sizes the bias table; inputs of
    another size still work (the table is resized on the fly), `set_feature_size` makes a size permanent.
    `bias_mode`: "relative" adds w before the softmax (the paper's choice), "relative_post" after it
    (the variant the paper rejects, Sec. 2.1), "none" is standard attention. `mlp_width` > 0 computes w
    with a RelativePositionMlp instead of a table; `table_resize` names how a table changes size.
    """

    def __init__(self, dim_in: int, dim_out: int, head_dim: int, feature_size: tuple[int, int],
                 bias_mode: BiasMode = "relative", qkv_bias: bool = True, attn_dim: int | None = None,
                 mlp_width: int = 0, table_resize: str = "bilinear"):
        super().__init__()
        attn_dim = attn_dim or dim_out  # width of q, k and v; the paper widens in qkv
        if attn_dim % head_dim:
            raise ValueError(f"head_dim={head_dim} does not divide the attention width {attn_dim}")
        self.num_heads = attn_dim // head_dim
        self.head_dim = head_dim
        self.bias_mode = bias_mode
        self.feature_size = tuple(feature_size)
        self.table_resize = table_resize
        self.qkv = Linear(dim_in, 3 * attn_dim, bias=qkv_bias)
        self.proj = Linear(attn_dim, dim_out)
        self.relative_position_mlp = None
        if bias_mode != "none" and mlp_width > 0:
            self.relative_position_mlp = RelativePositionMlp(self.num_heads, mlp_width)
        elif bias_mode != "none":
            h, w = self.feature_size
            self.relative_bias_table = nn.Parameter(torch.zeros(self.num_heads, 2 * h - 1, 2 * w - 1))
            nn.init.trunc_normal_(self.relative_bias_table, std=0.02)
        # False when the value bias cannot reach the loss (CoAtNet.freeze_redundant_parameters): its part of
        # qkv.bias then keeps its value but gets no gradient.
        self.value_bias_learns = True
        # Set by `freeze_bias()` for inference: the gathered (heads, N, N) bias, computed once.
        self.register_buffer("frozen_bias", None, persistent=False)

    def set_feature_size(self, size: tuple[int, int]) -> None:
        """Resize the table to an H x W map. Going back to the previous size before the table was
        changed restores the previous table exactly (resizing is lossy, a round trip should not be)."""
        size = tuple(size)
        if self.has_table and size != self.feature_size:
            table = self.relative_bias_table.data
            undo = getattr(self, "_undo", None)
            if undo is not None and undo[0] == size and torch.equal(undo[2], table):
                resized = undo[1]
            else:
                with torch.no_grad():
                    resized = resize_bias_table(table, size, self.table_resize).contiguous()
            self._undo = (self.feature_size, table.clone(), resized.clone())
            self.relative_bias_table = nn.Parameter(resized, requires_grad=self.relative_bias_table.requires_grad)
        self.feature_size = size
        self.frozen_bias = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint made at another resolution: resize its table to this module's map size.
        key = prefix + "relative_bias_table"
        if self.has_table and key in state_dict:
            table = state_dict[key]
            if table.ndim == 3 and table.shape[0] == self.num_heads and table.shape != self.relative_bias_table.shape:
                state_dict[key] = resize_bias_table(table.float(), self.feature_size, self.table_resize)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def freeze_bias(self) -> None:
        """Gather the bias once (inference): later forwards at this size skip the index gather."""
        self.frozen_bias = None
        if self.bias_mode != "none":
            with torch.no_grad():
                self.frozen_bias = self.bias(self.feature_size).contiguous()

    @property
    def has_table(self) -> bool:
        return self.bias_mode != "none" and self.relative_position_mlp is None

    def _qkv_bias(self) -> torch.Tensor | None:
        # NOTE: the key bias is left out. Softmax is invariant to it (it adds q_i . b_k to every logit of row
        # i), so its gradient is zero in exact arithmetic; AdamW would turn the roundoff left in that gradient
        # into lr-sized steps that differ with summation order (e.g. between 1 and N processes).
        b = self.qkv.bias
        if b is None:
            return None
        n = b.shape[0] // 3
        value = b[2 * n:] if self.value_bias_learns else b[2 * n:].detach()
        return torch.cat((b[:n], torch.zeros_like(b[n:2 * n]), value))

    def bias(self, size: tuple[int, int]) -> torch.Tensor:
        if self.frozen_bias is not None and size == self.feature_size:
            return self.frozen_bias
        if self.relative_position_mlp is not None:
            return gather_bias(self.relative_position_mlp.table(size), size)
        return gather_bias(self.relative_bias_table, size, self.table_resize)

    def forward(self, x: torch.Tensor, reference: bool = False) -> torch.Tensor:
        return self.proj(self.attend(x, reference))

    def attend(self, x: torch.Tensor, reference: bool = False) -> torch.Tensor:
        """Everything but the output projection: (B, H, W, dim_in) -> (B, H, W, attn_dim)."""
        B, H, W, _ = x.shape
        # An nn.Linear while training; inference_model swaps in a fused one with the key bias left out.
        qkv = linear(x, self.qkv.weight, self._qkv_bias()) if isinstance(self.qkv, nn.Linear) else self.qkv(x)
        q, k, v = qkv.reshape(B, H * W, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        # each (B, heads, N, head_dim)
        bias = None if self.bias_mode == "none" else self.bias((H, W)).to(q.dtype)  # (heads, N, N)
        # An empty batch (a process left without samples in an epoch's last step) takes the reference path:
        # fused attention gives the bias table no gradient then, and data-parallel ranks must all reduce it.
        # So does a one-token map (the last stage at 32 px): the softmax over one key is exactly 1, and its
        # backward gives q, k and the table exactly zero gradient where the fused kernel leaves roundoff.
        if reference or self.bias_mode == "relative_post" or B == 0 or H * W == 1:
            attn = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5  # (B, heads, N, N)
            if self.bias_mode == "relative":
                attn = attn + bias
            attn = attn.softmax(dim=-1)
            if self.bias_mode == "relative_post":
                attn = attn + bias
            out = attn @ v
        else:
            # A 4-D mask: with a 3-D one torch's CPU dispatcher falls back to the unfused math kernel.
            mask = None if bias is None else bias.unsqueeze(0)  # (1, heads, N, N)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, heads, N, head_dim)
        return out.transpose(1, 2).reshape(B, H, W, self.num_heads * self.head_dim)
