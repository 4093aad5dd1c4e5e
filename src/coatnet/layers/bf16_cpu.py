"""bf16 linears and dense convolutions on CPUs without bf16 dot-product instructions.

Under bf16 autocast torch sends linears and convolutions to oneDNN's bf16 kernels. On a CPU without
AVX512-BF16 or AMX those kernels emulate bf16 arithmetic and run 2-4x slower than the fp32 ones (measured
in docs/performance.md). The fp32 kernels give the same numbers: a bf16 value is exact in fp32, and so is
the product of two of them (8-bit significands), so upcasting the operands, multiplying with fp32
accumulation and rounding the result to bf16 is what a bf16 kernel with fp32 accumulation computes, up to
the order of its sums. Inputs, saved activations, outputs and gradients stay bf16; only the kernel differs.

`Linear` and `Conv2d` are nn.Linear and nn.Conv2d (same parameters and state-dict keys) that take this path
under CPU bf16 autocast when `emulated_bf16_cpu()`; depthwise convolutions keep torch's bf16 kernel, which
is faster than fp32 there (memory-bound). Set COATNET_NATIVE_BF16=1 to always use torch's kernels.
Models are built from nn.Linear and nn.Conv2d; `use_bf16_cpu_kernels(model)` swaps these classes in, as
nn.SyncBatchNorm.convert_sync_batchnorm swaps in its BatchNorm, where the runtime asks for it
(train/runtime.py: bf16 on a CPU that emulates it).
"""
from __future__ import annotations

import functools
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from .position_bias import RelativePositionMlp
from .squeeze_excite import SqueezeExcite

BF16 = torch.bfloat16


_BF16_INSTRUCTIONS = (("_is_avx512_bf16_supported", "AVX512-BF16"), ("_is_amx_tile_supported", "AMX"))


def _native_bf16_instructions() -> list[str]:
    """The bf16 instruction sets torch detects on this CPU (its checks, where this torch has them)."""
    cpu = getattr(torch, "cpu", None)
    checks = [(getattr(cpu, name, None), label) for name, label in _BF16_INSTRUCTIONS]
    return [label for check, label in checks if check is not None and check()]


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX), as torch detects them."""
    return bool(_native_bf16_instructions())


def cpu_features() -> str:
    """This CPU's vector instructions as torch's kernels use them: "AVX2", "AVX512", "AVX512, AVX512-BF16" or
    "AVX512, AVX512-BF16, AMX" (rows and speeds measured on different kinds differ, and a CPU's name does not
    tell them apart: one "AMD EPYC" has AVX512-BF16, another only AVX2)."""
    return ", ".join([torch.backends.cpu.get_cpu_capability(), *_native_bf16_instructions()])


@functools.cache
def bf16_matmul_speedup(repeats: int = 5) -> float:
    """How many times faster this CPU multiplies bf16 matrices than fp32 ones (fp32 time / bf16 time, median
    of `repeats`), on a (4096 x 256) @ (256 x 512) product, the size of a small model's linears and 1x1
    convolutions at a batch of a few hundred images. Measured once per process (~50 ms)."""
    a, b = torch.randn(4096, 256), torch.randn(256, 512)
    times = {}
    for dtype in (torch.float32, BF16):
        x, y = a.to(dtype), b.to(dtype)
        x @ y  # warm-up: kernel selection and packing
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            x @ y
            samples.append(time.perf_counter() - start)
        times[dtype] = sorted(samples)[repeats // 2]
    return times[torch.float32] / times[BF16]


_EMULATED: dict[str, bool] = {}


@torch.compiler.assume_constant_result
def emulated_bf16_cpu() -> bool:
    """Whether bf16 linears and dense convolutions go through fp32 kernels here: on a CPU without bf16
    instructions, unless COATNET_NATIVE_BF16=1. Decided once per process; torch.compile takes it as a constant
    (through functools.cache it warned the user on every compiled run and broke the graph at the CPU check)."""
    if "cpu" not in _EMULATED:
        _EMULATED["cpu"] = os.environ.get("COATNET_NATIVE_BF16") != "1" and not cpu_has_native_bf16()
    return _EMULATED["cpu"]


def _bf16_autocast_on_emulating_cpu(x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == BF16 and emulated_bf16_cpu())


def _cast(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(BF16)


class _LinearBf16(torch.autograd.Function):
    """y = x W^T + b on bf16 tensors, computed by fp32 kernels. x (..., in), W (out, in), b (out,)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(BF16)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        g = grad.float()
        gx = (g @ weight.float()).to(BF16) if ctx.needs_input_grad[0] else None
        g2 = g.reshape(-1, g.shape[-1])
        gw = (g2.t() @ x.reshape(-1, x.shape[-1]).float()).to(BF16) if ctx.needs_input_grad[1] else None
        gb = g2.sum(0).to(BF16) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb


class _Conv2dBf16(torch.autograd.Function):
    """2-D convolution on bf16 tensors (B, C, H, W), computed by fp32 kernels."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(x, weight)
        ctx.conf = (stride, padding, dilation, groups, None if bias is None else bias.shape)
        return F.conv2d(x.float(), weight.float(), None if bias is None else bias.float(),
                        stride, padding, dilation, groups).to(BF16)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups, bias_shape = ctx.conf
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias_shape is not None and ctx.needs_input_grad[2]]
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad.float(), x.float(), weight.float(), bias_shape, stride, padding, dilation, False, [0, 0],
            groups, mask)
        return (*(None if t is None else t.to(BF16) for t in (gx, gw, gb)), None, None, None, None)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, through fp32 kernels under bf16 autocast on an emulating CPU."""
    if not _bf16_autocast_on_emulating_cpu(x):
        return F.linear(x, weight, bias)
    with torch.autocast("cpu", enabled=False):
        return _LinearBf16.apply(x.to(BF16), weight.to(BF16), _cast(bias))


class Linear(nn.Linear):
    """nn.Linear whose bf16 autocast path uses fp32 kernels on CPUs that emulate bf16 (module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class Conv2d(nn.Conv2d):
    """nn.Conv2d whose bf16 autocast path uses fp32 kernels on CPUs that emulate bf16, except for
    depthwise convolutions (module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.groups > 1 or self.padding_mode != "zeros" or isinstance(self.padding, str)
                or not _bf16_autocast_on_emulating_cpu(x)):
            return super().forward(x)
        with torch.autocast("cpu", enabled=False):
            return _Conv2dBf16.apply(x.to(BF16), self.weight.to(BF16), _cast(self.bias), self.stride,
                                     self.padding, self.dilation, self.groups)


_SWAPS = {nn.Linear: Linear, nn.Conv2d: Conv2d}


def use_bf16_cpu_kernels(model: nn.Module,
                         keep: tuple[type[nn.Module], ...] = (SqueezeExcite, RelativePositionMlp)) -> nn.Module:
    """Give `model`'s linears and dense convolutions the bf16 path above, in place; returns `model`.

    Each module keeps its identity, parameters, state-dict keys and hooks: only its class changes to the
    subclass that differs in `forward` alone. Layers inside `keep` modules stay as they are: squeeze-excite
    gates and position-bias MLPs see one value per channel or a few hundred offsets, too little for the
    kernels to matter (and they have always used torch's)."""
    kept = {id(m) for k in model.modules() if isinstance(k, keep) for m in k.modules()}
    for m in model.modules():
        swap = _SWAPS.get(type(m))
        if swap is not None and id(m) not in kept and getattr(m, "groups", 1) == 1:
            m.__class__ = swap
    return model
