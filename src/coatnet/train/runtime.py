"""Device, precision, threads, determinism, memory format and compilation: decided here, once. The
device-specific choices behind them (kernels, backends, copies) are coatnet.device_plan's, with this
machine's abilities detected by `plan_for`."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
from torch import nn

from ..device_plan import PRECISIONS, DevicePlan, device_plan
from ..layers import bf16_cpu
from ..models.inference import onednn_fusion_available
from ..process_group import broadcast_object
from ..utils import reuse_freed_memory

MIN_BF16_SPEEDUP = 1.1  # "auto" takes bf16 on a CPU whose bf16 matrix products are at least this much faster
# What "auto" takes on a CPU, instead of deciding from the hardware: "fp32" or "bf16". The test suite runs as
# each kind of CPU would with it (docs/architecture.md, "Testing as every kind of CPU"): bf16 where auto would
# pick fp32 (on a CPU without bf16 instructions bf16 is emulated: slower, the same numbers) and fp32 where it
# would pick bf16.
AUTO_PRECISION_ENV = "COATNET_AUTO_PRECISION"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The precision context of forward passes for a resolved precision (`resolve_precision`): bf16
    autocast (weights stay fp32, matmuls and convolutions run in bf16) or, for fp32, nothing."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision {precision!r} is not one of fp32, bf16")
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: str  # "fp32" or "bf16" (autocast), resolved from "auto" by setup_runtime
    channels_last: bool
    compile: bool
    precision_reason: str = ""  # why this precision, in words (printed and recorded by the trainer)
    deterministic: bool = False

    @property
    def plan(self) -> DevicePlan:
        """The device-specific choices for this runtime's device (coatnet.device_plan)."""
        return plan_for(self.device, self.deterministic)

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.precision)

    def prepare(self, model: nn.Module) -> nn.Module:
        """Move the model to the device and memory format (parameters keep fp32: autocast casts), in place.
        bf16 on a CPU without bf16 instructions: linears and dense convolutions take fp32 kernels
        (layers/bf16_cpu.py, the same numbers 2-4x faster there)."""
        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        if self.precision == "bf16" and self.plan.bf16_cpu_kernels:
            bf16_cpu.use_bf16_cpu_kernels(model)
        return model

    def compiled(self, model: nn.Module):
        """The callable to run forward passes with (the compiled module, or the module itself)."""
        return torch.compile(model) if self.compile else model

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A host tensor on the device: page-locked first and copied asynchronously where the plan says
        (CUDA: the copy overlaps with the host's next work; torch keeps the pinned block until it is done)."""
        plan = device_plan(self.device.type)  # these two choices depend on the device type alone
        if plan.pin_memory and t.device.type == "cpu":
            t = t.pin_memory()
        return t.to(self.device, non_blocking=plan.non_blocking)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        x = self.to_device(x)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def plan_for(device: torch.device, deterministic: bool = False) -> DevicePlan:
    """`device_plan` for `device` with this machine's abilities detected (CPU bf16 instructions, the GPU's
    bf16 support, oneDNN's fused kernels)."""
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    cpu_native = device.type == "cpu" and not bf16_cpu.emulated_bf16_cpu()
    return device_plan(device.type, cuda_bf16=cuda_bf16, cpu_native_bf16=cpu_native,
                       onednn_fusion=device.type == "cpu" and onednn_fusion_available(), deterministic=deterministic)


def resolve_device(device: str) -> torch.device:
    """'auto', 'cpu', 'cuda', 'cuda:N', ... as a torch.device that exists here (ValueError otherwise)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} is not a device name (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available in this torch build or on this machine "
                             f"(torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        backend = getattr(torch, dev.type, None)  # torch.mps, torch.xpu, ...
        if backend is None or not getattr(backend, "is_available", lambda: False)():
            raise ValueError(f"device={device!r} is not available on this machine")
    return dev


def resolve_precision(precision: str, device: torch.device) -> tuple[str, str]:
    """("fp32" or "bf16", why) for a requested precision on `device`. "auto" takes bf16 autocast where the
    hardware computes bf16 natively and faster: CUDA GPUs with bf16 support; CPUs with AVX512-BF16 or AMX
    (as torch detects them) whose bf16 matrix products, timed here, beat fp32 by 10% or more (AMX: several
    times; some AVX512-BF16 CPUs run oneDNN's bf16 kernels slower than its fp32 ones, and bf16 would only
    cost accuracy there). fp32 elsewhere: without bf16 instructions bf16 is emulated. On a CPU, the environment
    variable COATNET_AUTO_PRECISION (fp32 or bf16) overrides the decision."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} must be one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision, "asked for"
    forced = os.environ.get(AUTO_PRECISION_ENV, "")
    if forced and device.type == "cpu":
        if forced not in ("fp32", "bf16"):
            raise ValueError(f"{AUTO_PRECISION_ENV}={forced!r} must be 'fp32' or 'bf16' (or unset: decided by the CPU)")
        return forced, f"auto: {AUTO_PRECISION_ENV}={forced} in the environment"
    if device.type == "cuda":
        plan = device_plan("cuda", cuda_bf16=torch.cuda.is_bf16_supported())
        if plan.auto_precision == "bf16":
            return "bf16", "auto: this GPU computes bf16 natively"
        return "fp32", "auto: this GPU has no bf16 support"
    if device.type == "cpu":
        if device_plan("cpu", cpu_native_bf16=bf16_cpu.cpu_has_native_bf16()).auto_precision != "measure":
            return "fp32", "auto: this CPU has no bf16 instructions (bf16 would be emulated)"
        speedup = bf16_cpu.bf16_matmul_speedup()
        if speedup >= MIN_BF16_SPEEDUP:
            return "bf16", f"auto: this CPU has bf16 instructions; bf16 matrix products run {speedup:.2f}x fp32's"
        return "fp32", (f"auto: this CPU has bf16 instructions, but its bf16 matrix products run at {speedup:.2f}x "
                        f"fp32's speed")
    return "fp32", f"auto: fp32 on {device.type}"


def setup_runtime(device: str = "auto", precision: str = "fp32", channels_last: bool = False,
                  compile: bool = False, threads: int | None = None, deterministic: bool = False) -> Runtime:
    """Apply process-wide settings (threads, deterministic kernels) and return the Runtime (precision
    "auto" resolved by `resolve_precision`)."""
    if threads or torch.get_num_threads() != (os.cpu_count() or 1):
        torch.set_num_threads(threads or os.cpu_count() or 1)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    dev = resolve_device(device)
    plan = plan_for(dev, deterministic)
    if plan.reuse_freed_memory:
        # Training on a CPU: glibc keeps freed memory for reuse instead of unmapping blocks over 32 MB, which
        # every batch-sized tensor of the batch augmentation and the larger activations page-faulted in anew.
        # Measured on a 2-core AMX Xeon: the main job 1.10x, fashion-mnist-full 1.15-1.2x, RandAugment (2, 15)
        # + normalisation of 64 images at 224 px 1.4x. The process keeps its peak memory (a training process
        # comes back to it every step anyway).
        reuse_freed_memory()
    if dev.type == "cuda":
        tf32 = plan.tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    # "auto" may time bf16 against fp32 here: rank 0's decision is every process's (broadcast_object: identity
    # in one process), so that the processes of a run never compute in different precisions.
    precision, reason = broadcast_object(resolve_precision(precision, dev))
    return Runtime(dev, precision, channels_last, compile, reason, deterministic)
