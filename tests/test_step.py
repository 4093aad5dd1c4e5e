"""The training step as an accelerator needs it: nothing read back from the device inside a step, one graph
under torch.compile with stochastic depth on, gradients reduced once per step under DDP, and the batch
augmentation that now runs on the device giving each sample what it gave before."""
from __future__ import annotations

import socket
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import coatnet
from coatnet.data.random import mix_int, uniform
from coatnet.data.transforms import AugmentConfig, mix_batch, mix_params, normalize, rand_augment
from coatnet.train import TrainConfig, train
from coatnet.train import engine, epoch
from coatnet.train.runtime import Runtime

CPU = Runtime(torch.device("cpu"), "fp32", channels_last=False, compile=False)


def _step_inputs(batch: int = 4, classes: int = 10, streams: int = 0, step: int = 0):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    labels = torch.randint(0, classes, (batch,), generator=g)
    targets = torch.nn.functional.one_hot(labels, classes).float()
    noise = epoch.drop_path_noise(0, step, torch.arange(batch) + 100 * step, streams) if streams else None
    return x, targets, labels, noise


# -- randomness without tensors --------------------------------------------------------------------------------
def test_keys_are_hashed_in_python_with_the_numbers_of_before():
    assert mix_int(1, 2, 3) == 3157955690 and mix_int(0, 7, 0xD903) == 2415749699  # the tensor version's values
    idx = torch.arange(50)
    compiled = torch.compile(lambda i: uniform(0, 5, i, 3), fullgraph=True, backend="eager")  # no int(tensor)
    torch.testing.assert_close(compiled(idx), uniform(0, 5, idx, 3))


# -- one graph -----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_training_step_with_stochastic_depth_has_no_graph_break():
    torch._dynamo.reset()
    model = coatnet.create_model("coatnet_nano", num_classes=10, drop_path_rate=0.2).train()
    streams = coatnet.layers.drop_path_streams(model)
    assert streams > 1
    x, targets, labels, noise = _step_inputs(streams=streams)
    explained = torch._dynamo.explain(epoch.micro_batch_loss)(model, x, targets, labels, noise, CPU)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


@pytest.mark.slow
def test_twenty_compiled_training_steps_compile_once(colour_images, monkeypatch):
    """The engine's own loop (drop path 0.2, two micro-batches per step): 27 steps of equal size, one graph
    compiled once; nothing that changes per step (the step, the samples) is guarded on."""
    torch._dynamo.reset()
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend=counting))
    res = train(TrainConfig(data=str(colour_images), model="coatnet_nano", val_fraction=0.25, batch_size=8,
                            micro_batch_size=4, epochs=3, drop_path=0.2, compile=True, precision="fp32",
                            workers=0, progress=False, quiet=True, threads=1, precise_bn=0))
    assert res["steps"] == 27
    assert len(graphs) == 1, f"{len(graphs)} graphs compiled in 27 steps"


# -- no read-back inside a step -------------------------------------------------------------------------------
def _in_kornia_cpu_check() -> bool:
    """Whether the caller is kornia's _check_async (kornia >= 0.9.2 checks equalize's input range with it).
    It reads the check's verdict with bool() only for a CPU tensor; for a CUDA tensor it calls
    torch._assert_async, which does not wait for the device. On the CPU that read is no device sync."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name == "_check_async" and frame.f_globals.get("__name__", "").startswith("kornia"):
            return True
        frame = frame.f_back
    return False


class _Reads(TorchDispatchMode):
    """Counts the ops that copy one number from a tensor to Python (.item(), bool(t), float(t), ...), except
    kornia's range check, which makes that read on the CPU only (see _in_kornia_cpu_check)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and not (
                args[0].device.type == "cpu" and _in_kornia_cpu_check()):
            self.count += 1
        return func(*args, **(kwargs or {}))


def _read_unwatched(batches):
    """The batches, each read with the counting mode off: decoding is the DataLoader workers' (host) work,
    here done in the main process (workers=0)."""
    from torch.utils._python_dispatch import _disable_current_modes

    while True:
        with _disable_current_modes():
            batch = next(batches, None)
        if batch is None:
            return
        yield batch


def test_an_epoch_of_steps_reads_no_number_back_from_the_device(colour_images, monkeypatch):
    """The old step read the loss and the hits of every micro-batch (.item()); now the host reads the device's
    numbers every SYNC_EVERY steps, as one list (tolist, not counted here: it is not inside a step)."""
    reads = []
    real, real_data = engine.train_one_epoch, engine.epoch_data

    def counted(*args, **kwargs):
        with _Reads() as mode:
            out = real(*args, **kwargs)
        reads.append(mode.count)
        return out

    def unwatched_data(*args, **kwargs):
        data = real_data(*args, **kwargs)
        data.batches = _read_unwatched(data.batches)
        return data

    monkeypatch.setattr(engine, "train_one_epoch", counted)
    monkeypatch.setattr(engine, "epoch_data", unwatched_data)
    res = train(TrainConfig(data=str(colour_images), model="coatnet_nano", val_fraction=0.25, batch_size=8,
                            micro_batch_size=4, epochs=1, drop_path=0.2, mixup=0.8, randaugment_n=2,
                            precision="fp32", workers=0, progress=False, quiet=True, threads=1, precise_bn=0))
    assert res["steps"] == 9 and reads == [0]


def test_a_nonfinite_step_is_skipped_on_the_device_and_named_when_read(colour_images):
    from coatnet.train import NonFiniteLossError

    cfg = dict(data=str(colour_images), model="coatnet_nano", val_fraction=0.25, batch_size=8, epochs=1, lr=1e30,
               clip_grad=None, weight_decay=0, precision="fp32", workers=0, progress=False, quiet=True, threads=1,
               precise_bn=0)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step \d+ \(epoch 1, batch \d+/9\)"):
        train(TrainConfig(**cfg))
    res = train(TrainConfig(**cfg, skip_nonfinite=True))
    assert res["nonfinite_steps"] > 0 and res["steps"] == 9


def test_the_fused_optimizer_skips_a_flagged_step_entirely():
    from coatnet.train.optim import WeightEMA, build_optimizer, skips_on_device, step

    model = coatnet.create_model("coatnet_nano", num_classes=10)
    opt = build_optimizer(model, 1e-2, 0.05)
    ema = WeightEMA(model, 0.9)
    assert skips_on_device(opt)
    for skip in (0.0, 1.0):
        model(torch.randn(2, 3, 32, 32)).sum().backward()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        moments = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
        ema_before = {k: v.clone() for k, v in ema.state.items()}
        step(opt, torch.tensor(skip))
        ema.update(model, skip=torch.tensor(skip))
        changed = any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert changed == (skip == 0.0)
        if skip:
            assert all(torch.equal(moments[id(p)][k], v) for p, s in opt.state.items() for k, v in s.items())
            assert all(torch.equal(ema_before[k], v) for k, v in ema.state.items())
        opt.zero_grad()
    # A checkpoint's optimizer state brings its groups' settings: one saved by an FSDP run (foreach) cannot skip.
    from coatnet.train.optim import param_groups

    opt.load_state_dict(torch.optim.AdamW(param_groups(model, 0.05), foreach=True).state_dict())
    assert not skips_on_device(opt)


# -- DDP: one reduction per step ------------------------------------------------------------------------------
def test_under_ddp_only_the_last_micro_batch_reduces_gradients():
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from coatnet.train.distributed import gradient_sync

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = dist.TCPStore("127.0.0.1", port, 1, True)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(torch.nn.Linear(3, 2))
        for net in (ddp, torch.compile(ddp, backend="eager")):
            with gradient_sync(net, enabled=False):
                assert ddp.require_backward_grad_sync is False
            with gradient_sync(net, enabled=True):
                assert ddp.require_backward_grad_sync is True
        with gradient_sync(torch.nn.Linear(3, 2), enabled=False):  # one process: nothing to hold back
            pass
    finally:
        dist.destroy_process_group()


# -- augmentation on the device -------------------------------------------------------------------------------
def test_rand_augment_gives_each_sample_the_same_result_gathered_or_masked():
    x = torch.rand(32, 3, 24, 24)
    idx = torch.arange(500, 532)
    gathered = rand_augment(x, 0, 3, idx, n=2, m=15, gather=True)
    masked = rand_augment(x, 0, 3, idx, n=2, m=15, gather=False)  # the accelerator's way
    torch.testing.assert_close(masked, gathered, rtol=1e-5, atol=1e-5)


def test_mixing_with_draws_made_before_the_copy_equals_mixing_in_one_go():
    x, labels, idx = torch.rand(6, 3, 16, 16), torch.arange(6) % 4, torch.arange(40, 46)
    aug = AugmentConfig(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)
    params = mix_params(0, 2, idx, aug, 16, 16)
    torch.testing.assert_close(mix_batch(x, labels, 4, 0, 2, idx, aug, params), mix_batch(x, labels, 4, 0, 2, idx, aug))
    torch.testing.assert_close(normalize((x * 255).round().to(torch.uint8), (0.5,) * 3, (0.25,) * 3),
                               normalize((x * 255).round() / 255, (0.5,) * 3, (0.25,) * 3))
