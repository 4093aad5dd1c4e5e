"""Every device-specific choice of the package, decided in one place from the device type and what the
hardware can do: `device_plan(device_type, ...)` is a pure function, so each decision is testable with
the device type as an argument, without the device.

Callers pass the abilities they have detected (bf16 instructions, oneDNN's fused kernels) and read the
decision they need: the process group's backend (process_group.py), the synchronized BatchNorm
(train/distributed), pinned memory and asynchronous copies, the bf16 kernel swap and TF32
(train/runtime.py), the fused optimizer (train/optim.py), inference_model's oneDNN kernels and batch
chunking (models/inference.py), malloc settings (bench.py). On CUDA that is the CUDA path throughout:
torch's own fused kernels (cuDNN, SDPA, fused AdamW), NCCL, torch's nn.SyncBatchNorm, page-locked host
memory with non-blocking copies, bf16 autocast where the GPU has bf16.
"""
from __future__ import annotations

from dataclasses import dataclass

SYNC_BATCHNORM_KINDS = ("torch", "coatnet")
PRECISIONS = ("auto", "fp32", "bf16")  # what a run may ask for; "auto" takes the plan's auto_precision


@dataclass(frozen=True)
class DevicePlan:
    """What the package does on one device type (see `device_plan`)."""

    device_type: str
    dist_backend: str  # torch.distributed backend of a process whose tensors live on this device
    sync_batchnorm: str  # "torch": nn.SyncBatchNorm (fused CUDA kernels); "coatnet": ours (any backend, gloo)
    pin_memory: bool  # host batches page-locked before the copy, so that it can run asynchronously
    non_blocking: bool  # host-to-device copies return at once (ordered on the device's stream)
    fused_optimizer: bool  # AdamW(fused=True): torch's one-kernel-per-tensor path
    auto_precision: str  # what precision "auto" takes: "bf16", "fp32", or "measure" (time bf16 vs fp32 first)
    bf16_cpu_kernels: bool  # bf16 linears/convolutions through fp32 kernels (layers/bf16_cpu.py)
    tf32: bool  # TF32 tensor cores for fp32 matmuls and convolutions
    onednn_fusion: bool  # inference_model: oneDNN's fused conv/linear + GELU kernels, gated SE projection
    chunk_large_maps: bool  # inference_model: MBConv batches cut below glibc's mmap threshold
    reuse_freed_memory: bool  # glibc mallopt (coatnet.utils.reuse_freed_memory) may help here


def device_plan(device_type: str, *, cuda_bf16: bool = True, cpu_native_bf16: bool = False,
                onednn_fusion: bool = False, deterministic: bool = False) -> DevicePlan:
    """The plan for `device_type` ("cpu", "cuda", "mps", ...) given the hardware's abilities:
    `cuda_bf16` (the GPU computes bf16: Ampere and later), `cpu_native_bf16` (AVX512-BF16 or AMX, or the
    user asked for torch's own bf16 kernels), `onednn_fusion` (this torch build has oneDNN's fused
    pointwise kernels), `deterministic` (reproducible kernels asked for: no TF32)."""
    if device_type == "cuda":
        return DevicePlan(
            device_type, dist_backend="cpu:gloo,cuda:nccl", sync_batchnorm="torch", pin_memory=True,
            non_blocking=True, fused_optimizer=True, auto_precision="bf16" if cuda_bf16 else "fp32",
            bf16_cpu_kernels=False, tf32=not deterministic, onednn_fusion=False, chunk_large_maps=False,
            reuse_freed_memory=False)
    if device_type == "cpu":
        return DevicePlan(
            device_type, dist_backend="gloo", sync_batchnorm="coatnet", pin_memory=False, non_blocking=False,
            fused_optimizer=True, auto_precision="measure" if cpu_native_bf16 else "fp32",
            bf16_cpu_kernels=not cpu_native_bf16, tf32=False, onednn_fusion=onednn_fusion, chunk_large_maps=True,
            reuse_freed_memory=True)
    # Other accelerators (mps, xpu, ...): torch's generic paths, nothing CPU- or CUDA-specific.
    return DevicePlan(
        device_type, dist_backend="gloo", sync_batchnorm="coatnet", pin_memory=False, non_blocking=False,
        fused_optimizer=False, auto_precision="fp32", bf16_cpu_kernels=False, tf32=False, onednn_fusion=False,
        chunk_large_maps=False, reuse_freed_memory=False)
