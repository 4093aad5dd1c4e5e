"""Benchmarking: throughput, latency, peak memory, multiply-adds and achieved GFLOP/s of a model, measured
interleaved against other models (timm's CoAtNets) in one process so that noise on a shared machine hits
every model alike.

The library never imports timm except in `timm_model` (the `--compare-timm` path) and in pipeline_bench.py's
comparison of input pipelines (`--input-pipeline`).
"""
from __future__ import annotations

import statistics
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from .device_plan import device_plan
from .export import onnx_session
from .layers import bf16_cpu
from .layers.bf16_cpu import cpu_has_native_bf16
from .models import create_model, inference_model
from .models.flops import conv_backward_flops
from .train.runtime import autocast, resolve_device
from .utils import reuse_freed_memory


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(model: nn.Module, batch: torch.Tensor, precision: str, train: bool,
              num_classes: int) -> Callable[[], None]:
    """A callable running one inference forward (no autograd) or one training step (forward,
    cross-entropy, backward, SGD update) of `model` on `batch` (B, C, H, W)."""
    device = batch.device
    if not train:
        model.eval()

        def infer() -> None:
            with torch.inference_mode(), autocast(device, precision):
                model(batch)
        return infer

    model.train()
    labels = torch.randint(0, max(num_classes, 1), (batch.shape[0],), device=device)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def train_step() -> None:
        with autocast(device, precision):
            logits = model(batch)
        loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return train_step


def time_interleaved(steps: dict[str, Callable[[], None]], device: torch.device, warmup: int = 2,
                     repeats: int = 5) -> dict[str, list[float]]:
    """Seconds per call of each step, timed round-robin (ours, theirs, ours, ...) after `warmup` calls
    of each; returns every timing so the caller can take medians."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


class _LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of the storages created under it that are still referenced, and their peak.
    Views share their base's storage; a storage is released when the last tensor viewing it dies."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._storages: dict[int, list[int]] = {}  # data_ptr -> [bytes, live tensors]

    def _release(self, ptr: int) -> None:
        entry = self._storages.get(ptr)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self.live -= entry[0]
                del self._storages[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                ptr = storage.data_ptr()
                if ptr == 0:
                    continue
                if ptr not in self._storages:
                    self._storages[ptr] = [storage.nbytes(), 0]
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                self._storages[ptr][1] += 1
                weakref.finalize(t, self._release, ptr)
        return out


def peak_memory_bytes(step: Callable[[], None], device: torch.device) -> int:
    """Peak memory that one call allocates beyond what existed before it (activations, gradients,
    temporaries; not the weights). On CUDA the allocator's counter; on the CPU the peak of the bytes
    of live tensors created during the call (tensors autograd saves for backward included)."""
    if device.type == "cuda":
        synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    tracker = _LiveTensorBytes()
    # Saved tensors are held as Python objects, so the tracker sees when autograd frees them.
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t), tracker:
        step()
    return tracker.peak


def count_step_flops(model: nn.Module, batch: torch.Tensor, train: bool) -> int:
    """Floating-point operations (2 per multiply-add) of one inference forward, or of one training step's
    forward and backward, counted by torch's FlopCounterMode on `batch` (with grouped convolutions' weight
    gradients counted per group: see models.flops.conv_backward_flops)."""
    was_training = model.training
    model.train(train)
    with FlopCounterMode(display=False,
                         custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flops}) as counter:
        if train:
            model(batch).float().logsumexp(1).sum().backward()
            model.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                model(batch)
    model.train(was_training)
    return counter.get_total_flops()


MATMUL, MATMUL_SIZE = "matmul", 2048


def matmul_gflops(device: torch.device, n: int = MATMUL_SIZE, repeats: int = 5) -> float:
    """Achieved GFLOP/s of an n x n fp32 matmul (median of `repeats`): the machine's practical peak."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


# -- the models -------------------------------------------------------------------------------------
# timm's counterpart of each of our variants: the paper-style model (stride in the depthwise conv) for
# downsample="dwconv", and timm's fastest CoAtNet ("rw": its own layout) for our paper default.
TIMM_EQUIVALENTS = {f"coatnet_{i}": {"dwconv": f"coatnet_{i}_224", "conv1x1": f"coatnet_{i}_rw_224"}
                    for i in range(4)}


def default_timm_name(name: str, downsample: str) -> str:
    if name not in TIMM_EQUIVALENTS:
        raise ValueError(f"no timm counterpart of {name!r} is known (known: {', '.join(TIMM_EQUIVALENTS)}); "
                         "name one with --timm-model")
    return TIMM_EQUIVALENTS[name][downsample]


def timm_model(name: str, num_classes: int = 1000) -> nn.Module:
    """timm's model `name`, randomly initialised. The only place the package imports timm."""
    try:
        import timm  # noqa: PLC0415  (optional, for side-by-side benchmarks only)
    except ImportError:
        raise ValueError("--compare-timm needs timm, which is not importable here; build an environment "
                         "with ../shared/tools/timm-env.sh and run the bench with its python") from None
    if name not in timm.list_models():
        raise ValueError(f"timm has no model named {name!r}")
    return timm.create_model(name, pretrained=False, num_classes=num_classes)


def prepare(model: nn.Module, device: torch.device, train: bool, channels_last: bool, compile: bool,
            ours: bool, precision: str = "fp32") -> nn.Module:
    """The model as it will be timed: on `device`; ours for inference through `inference_model`
    (channels-last inside), otherwise in `channels_last` memory when asked; ours in bf16 on a CPU that
    emulates bf16 with the fp32-kernel path, as training runs it (layers/bf16_cpu.py); optionally
    torch.compile'd."""
    model = model.to(device)
    if ours and not train:
        model = inference_model(model, channels_last=True)
    elif channels_last:
        model = model.to(memory_format=torch.channels_last)
    plan = device_plan(device.type, cpu_native_bf16=not bf16_cpu.emulated_bf16_cpu())
    if ours and precision == "bf16" and plan.bf16_cpu_kernels:
        bf16_cpu.use_bf16_cpu_kernels(model)
    return torch.compile(model) if compile else model


@dataclass
class Measurement:
    """One model's numbers (medians over repeated timed runs)."""

    model: str
    images_per_s: float
    latency_ms: float  # per batch
    peak_memory_mb: float
    macs_per_image: int  # of one forward pass
    gflops: float  # achieved: counted FLOPs of the timed step (forward, or forward + backward) / time
    times_s: list[float] = field(default_factory=list)


@dataclass
class BenchResult:
    settings: dict
    matmul_gflops: float
    ours: Measurement
    timm: Measurement | None = None

    @property
    def ratios(self) -> dict[str, float] | None:
        """ours / timm: images/s and GFLOP/s (higher is better for us), memory (lower is better)."""
        if self.timm is None:
            return None
        return {"images_per_s": self.ours.images_per_s / self.timm.images_per_s,
                "peak_memory": self.ours.peak_memory_mb / max(self.timm.peak_memory_mb, 1e-9)}

    def to_dict(self) -> dict:
        def m(x: Measurement | None) -> dict | None:
            return None if x is None else {k: v for k, v in x.__dict__.items()}
        return {"settings": self.settings, "matmul_2048_gflops": self.matmul_gflops, "ours": m(self.ours),
                "timm": m(self.timm), "ratios": self.ratios,
                "gflops_fraction_of_matmul": self.ours.gflops / self.matmul_gflops}


def benchmark(name: str, batch: int = 8, img_size: int | None = None, precision: str = "fp32", train: bool = False,
              compile: bool = False, channels_last: bool = False, threads: int | None = None,
              device: str = "cpu", compare_timm: bool = False, timm_name: str | None = None,
              overrides: dict | None = None, warmup: int = 2, repeats: int = 5, seed: int = 0,
              reuse_memory: bool = False) -> BenchResult:
    """Measure our model `name` (with config `overrides`), and timm's counterpart interleaved with it
    when `compare_timm`, at `img_size` (None: the model's own). See `Measurement` for what is reported. `reuse_memory`:
    coatnet.utils.reuse_freed_memory() first (process-wide: timm's model profits too)."""
    dev = resolve_device(device)
    # Process-wide, so both models profit alike: see reuse_freed_memory.
    malloc_reuse = reuse_memory and device_plan(dev.type).reuse_freed_memory and reuse_freed_memory()
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads {threads} must be at least 1")
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    ours = create_model(name, img_size=img_size, **overrides)
    img_size = ours.config.image_size[0] if img_size is None else img_size  # None: the model's own size
    num_classes = ours.num_classes
    downsample = ours.config.mbconv.downsample
    models = {name: ours}
    if compare_timm:
        timm_name = timm_name or default_timm_name(name, downsample)
        models[f"timm:{timm_name}"] = timm_model(timm_name, num_classes)
    x = torch.randn(batch, ours.in_chans, img_size, img_size, device=dev)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    flops = {k: count_step_flops(m.to(dev), x[:1], train) for k, m in models.items()}
    macs = {k: count_step_flops(m, x[:1], False) // 2 for k, m in models.items()}
    prepared = {k: prepare(m, dev, train, channels_last, compile, ours=k == name, precision=precision)
                for k, m in models.items()}
    steps = {k: make_step(m, x, precision, train, num_classes) for k, m in prepared.items()}
    # The machine's practical peak, timed in the same round-robin as the models.
    a, b = torch.randn(MATMUL_SIZE, MATMUL_SIZE, device=dev), torch.randn(MATMUL_SIZE, MATMUL_SIZE, device=dev)
    times = time_interleaved({**steps, MATMUL: lambda: a @ b}, dev, warmup=warmup, repeats=repeats)
    reference = 2 * MATMUL_SIZE**3 / statistics.median(times.pop(MATMUL)) / 1e9
    results = {}
    for k, step in steps.items():
        seconds = statistics.median(times[k])
        results[k] = Measurement(
            model=k, images_per_s=batch / seconds, latency_ms=seconds * 1e3,
            peak_memory_mb=peak_memory_bytes(step, dev) / 2**20, macs_per_image=macs[k],
            gflops=flops[k] * batch / seconds / 1e9, times_s=times[k])
    settings = dict(model=name, overrides=overrides, batch=batch, img_size=img_size, precision=precision,
                    train=train, compile=compile, channels_last=channels_last, threads=torch.get_num_threads(),
                    device=str(dev), torch=torch.__version__, warmup=warmup, repeats=repeats,
                    malloc_reuse=malloc_reuse,
                    bf16_native=cpu_has_native_bf16() if dev.type == "cpu" else None)
    other = [v for k, v in results.items() if k != name]
    return BenchResult(settings, reference, results[name], other[0] if other else None)


def benchmark_exported(model: nn.Module, path: str, fmt: str, batch: int = 8, threads: int | None = None,
                       warmup: int = 2, repeats: int = 5) -> dict[str, float]:
    """Images/s of an exported file (onnxruntime, or the TorchScript module) and of PyTorch's
    `inference_model` on the same batch, interleaved: {"pytorch": ..., fmt: ...}."""
    if threads is not None:
        torch.set_num_threads(threads)
    x = torch.randn(batch, model.in_chans, *model.config.image_size)
    fast = inference_model(model)
    steps: dict[str, Callable[[], None]] = {"pytorch": make_step(fast, x, "fp32", False, model.num_classes)}
    if fmt == "onnx":
        session, feed = onnx_session(path, threads or torch.get_num_threads()), {"images": x.numpy()}
        steps["onnxruntime"] = lambda: session.run(None, feed)
    else:
        module = torch.jit.load(path, map_location="cpu")
        steps["torchscript"] = make_step(module, x, "fp32", False, model.num_classes)
    times = time_interleaved(steps, torch.device("cpu"), warmup=warmup, repeats=repeats)
    return {k: batch / statistics.median(v) for k, v in times.items()}
