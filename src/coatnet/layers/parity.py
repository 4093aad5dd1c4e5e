"""Cross-process parity: the places where the attention departs from the plain computation so that a run
on N data-parallel processes takes exactly the steps of a run on one process.

Every difference below is one that exact arithmetic does not have. AdamW divides each gradient by its own
running RMS, so a gradient that is zero in exact arithmetic but carries roundoff becomes an lr-sized step
whose sign depends on summation order, which differs between 1 and N processes (and between batch
splits). Such gradients must be exactly zero, or the parameter must not be stepped at all:

- Key bias: left out of the qkv projection (`QkvLinear`). Softmax is invariant to it (it adds q_i . b_k
  to every logit of row i), so it cannot change the output and its gradient is zero in exact arithmetic.
- Value bias: its gradient stopped (values kept) where the attention's output bias is redundant
  (`QkvLinear.value_bias_learns`, set by coatnet.train.redundant): softmax rows sum to one, so a value
  bias only adds a constant that the output bias already is.
- The reference attention path instead of fused SDPA (`needs_reference_path`) for an empty batch (a
  process left without samples in an epoch's last step: fused attention gives the bias table no gradient
  then, and data-parallel processes must all reduce one) and for a one-token map (the last stage at
  32 px: the softmax over one key is exactly 1, and its backward gives q, k and the table exactly zero
  gradient where the fused kernel leaves roundoff).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class QkvLinear(nn.Linear):
    """The attention's q, k, v projection (..., in) -> (..., 3 * attn_dim): an nn.Linear (same parameters
    and state-dict keys) whose key bias is left out and whose value bias learns only while
    `value_bias_learns` (module docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, **kwargs):
        super().__init__(in_features, out_features, bias, **kwargs)
        self.value_bias_learns = True

    def effective_bias(self) -> Optional[torch.Tensor]:
        """The bias the projection adds: (q bias, zeros, v bias), the v part detached unless it learns."""
        b = self.bias
        if b is None:
            return None
        n = b.shape[0] // 3
        value = b[2 * n:] if self.value_bias_learns else b[2 * n:].detach()
        return torch.cat((b[:n], torch.zeros_like(b[n:2 * n]), value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.effective_bias())

    def folded(self) -> nn.Linear:
        """An nn.Linear computing the same values, its bias `effective_bias()` (for inference: no gradients)."""
        out = nn.utils.skip_init(nn.Linear, self.in_features, self.out_features, bias=self.bias is not None,
                                 device=self.weight.device, dtype=self.weight.dtype)
        out.weight = nn.Parameter(self.weight.detach().clone(), requires_grad=False)
        if self.bias is not None:
            out.bias = nn.Parameter(self.effective_bias().detach().clone(), requires_grad=False)
        return out


def needs_reference_path(q: torch.Tensor) -> bool:
    """Whether attention on q (B, heads, N, head_dim) must take the reference path: an empty batch or a
    one-token map (module docstring)."""
    return q.shape[0] == 0 or q.shape[2] == 1
