"""The relative position bias w of the CoAtNet paper's eq. 3, as plug-ins for RelativeAttention2d.

    y_i = sum_j softmax_j(q_i . k_j / sqrt(d) + w[i - j]) v_j

w has one entry per 2-D offset (dy, dx) and per head: for an H x W map the offsets span (2H-1) x (2W-1).
A plug-in is a module with one method, `bias(size)`, giving the (heads, N, N) bias of an H x W map
(N = H*W): entry [h, i, j] is head h's w[i - j], read from a table through `relative_position_index`.
Two plug-ins:

- `RelativePositionTable`: w learned as a (heads, 2H-1, 2W-1) grid, the paper's choice, with the index of
  its own map size as a buffer. Another map size reads a resized grid (bilinear, or timm's geometric rule:
  table_resize.py), so fine-tuning at 384/512 (paper, Sec. 4) starts from the resized table.
- `RelativePositionMlp`: w computed by an MLP over log-spaced offsets, timm's "rmlp" CoAtNets. It holds
  no per-resolution state: its table and index are made for the size asked.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.fx
from torch import nn

from .table_resize import resize_table


def relative_position_index(height: int, width: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """(H*W, H*W) index into a flattened (2H-1, 2W-1) table: entry [i, j] encodes the offset i - j."""
    ys, xs = torch.meshgrid(
        torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij"
    )
    coords = torch.stack([ys.flatten(), xs.flatten()])  # (2, N)
    offsets = coords[:, :, None] - coords[:, None, :]  # (2, N, N), each in [-(size-1), size-1]
    # Row stride is the table's width 2W-1, so distinct offsets never share an entry.
    return (offsets[0] + height - 1) * (2 * width - 1) + (offsets[1] + width - 1)


def gather_bias(table: torch.Tensor, size: Tuple[int, int], mode: str = "bilinear",
                index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The (heads, N, N) additive bias for an H x W map from a (heads, 2H'-1, 2W'-1) table, resized (`mode`)
    when its grid is not the map's. `index`: the table's own relative_position_index (built when None, or
    when the table is resized)."""
    if table.shape[-2] != 2 * size[0] - 1 or table.shape[-1] != 2 * size[1] - 1:
        table, index = resize_table(table, size, mode), None
    if index is None:
        index = relative_position_index(size[0], size[1], device=table.device)
    return table.flatten(1)[:, index]  # (heads, N, N)


def log_spaced_offsets(height: int, width: int, device: Optional[torch.device] = None,
                       dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """(2H-1, 2W-1, 2) grid of (dy, dx) offsets, each mapped to sign(d) * log(1 + |d|)."""
    dy = torch.arange(-(height - 1), height, device=device, dtype=torch.float32)
    dx = torch.arange(-(width - 1), width, device=device, dtype=torch.float32)
    grid = torch.stack(torch.meshgrid(dy, dx, indexing="ij"), dim=-1)
    return (torch.sign(grid) * torch.log1p(grid.abs())).to(dtype if dtype is not None else torch.float32)


# Leaf functions for torch.fx (as timm's register_notrace_function): their work depends on the map size,
# which symbolic tracing only knows as a proxy.
torch.fx.wrap("gather_bias")
torch.fx.wrap("log_spaced_offsets")


class RelativePositionTable(nn.Module):
    """w as a learned (heads, 2H-1, 2W-1) table for an H x W map (`size`), read through the buffer
    `relative_position_index`; other sizes read it resized by `resize_mode` ("bilinear" or "geometric").
    `set_size` makes a size permanent; a state dict made at another size loads resized."""

    def __init__(self, num_heads: int, size: Tuple[int, int], resize_mode: str = "bilinear"):
        super().__init__()
        self.size = tuple(size)
        self.resize_mode = resize_mode
        h, w = self.size
        self.relative_bias_table = nn.Parameter(torch.zeros(num_heads, 2 * h - 1, 2 * w - 1))
        nn.init.trunc_normal_(self.relative_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(h, w), persistent=False)
        # The table before the last set_size, and its size: going back before training restores it exactly.
        self.register_buffer("table_before_resize", None, persistent=False)
        self.size_before_resize: Optional[Tuple[int, int]] = None

    def bias(self, size: Tuple[int, int]) -> torch.Tensor:
        return gather_bias(self.relative_bias_table, size, self.resize_mode, self.relative_position_index)

    @torch.no_grad()
    def set_size(self, size: Tuple[int, int]) -> None:
        """Resize the table (the parameter stays the same object) and its index to an H x W map. Resizing is
        lossy, a round trip is not: going back to the previous size, before the table was trained or
        loaded, restores the previous table exactly."""
        size = tuple(size)
        if size == self.size:
            return
        table, before = self.relative_bias_table.data, self.table_before_resize
        # Untouched since the last resize when resizing the previous table again gives it back, bit for bit.
        if size == self.size_before_resize and torch.equal(resize_table(before, self.size, self.resize_mode), table):
            resized = before
        else:
            resized = resize_table(table, size, self.resize_mode).contiguous()
        self.table_before_resize, self.size_before_resize = table, self.size
        self.relative_bias_table.data = resized
        self.relative_position_index = relative_position_index(size[0], size[1], device=table.device)
        self.size = size

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "relative_bias_table"
        table = state_dict.get(key)
        own = self.relative_bias_table
        if table is not None and table.ndim == 3 and table.shape[0] == own.shape[0] and table.shape != own.shape:
            state_dict[key] = resize_table(table.float(), self.size, self.resize_mode)  # made at another size
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"size={self.size}, resize_mode={self.resize_mode!r}"


class RelativePositionMlp(nn.Module):
    """w = mlp(sign(d) * log(1 + |d|)) for each offset d = (dy, dx): the log-spaced coordinates of
    Swin-V2 (Liu et al. 2022) in timm's "cr" form, 2 -> hidden (ReLU, dropout 0.125 in training, as
    timm) -> heads. Any map size gets its table by evaluating the MLP on that size's offsets."""

    def __init__(self, num_heads: int, hidden: int = 512, dropout: float = 0.125):
        super().__init__()
        self.fc1 = nn.Linear(2, hidden)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, num_heads)

    def table(self, size: Tuple[int, int]) -> torch.Tensor:
        """The (heads, 2H-1, 2W-1) table for an H x W map, laid out like RelativePositionTable's."""
        coords = log_spaced_offsets(size[0], size[1], device=self.fc1.weight.device, dtype=self.fc1.weight.dtype)
        return self.fc2(self.drop(self.act(self.fc1(coords)))).permute(2, 0, 1)  # (heads, 2H-1, 2W-1)

    def bias(self, size: Tuple[int, int]) -> torch.Tensor:
        return gather_bias(self.table(size), size)
