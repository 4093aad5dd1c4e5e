"""Runtime decisions (train/runtime.py): the precision `auto` picks per device and hardware, and the
evaluation's test-time flip."""
import math

import pytest
import torch

from coatnet.data.datasets import DataSpec, TensorSource
from coatnet.layers import bf16_cpu
from coatnet.train.evaluate import evaluate
from coatnet.train.runtime import resolve_precision, setup_runtime

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("native, speedup, expected", [(True, 3.0, "bf16"), (True, 1.1, "bf16"),
                                                       (True, 0.6, "fp32"), (False, 3.0, "fp32")])
def test_auto_precision_on_cpu_takes_bf16_where_native_and_faster(monkeypatch, native, speedup, expected):
    # the hardware's decision, even when the suite forces it
    monkeypatch.delenv("COATNET_AUTO_PRECISION", raising=False)
    monkeypatch.setattr(bf16_cpu, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(bf16_cpu, "bf16_matmul_speedup", lambda: speedup)
    precision, why = resolve_precision("auto", CPU)
    assert precision == expected and why.startswith("auto:")
    assert (f"{speedup:.2f}x" in why) == native  # the measurement is named when it decided


@pytest.mark.parametrize("forced", ["fp32", "bf16"])
@pytest.mark.parametrize("native, speedup", [(True, 4.5), (True, 0.8), (False, 1.0)])
def test_auto_precision_can_be_forced_on_any_cpu(monkeypatch, forced, native, speedup):
    """COATNET_AUTO_PRECISION makes `auto` take bf16 where the CPU would give fp32 and fp32 where it would give
    bf16 (the suite runs as each kind of CPU would with it); the reason names it; explicit precisions and CUDA's
    auto are untouched."""
    monkeypatch.setattr(bf16_cpu, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(bf16_cpu, "bf16_matmul_speedup", lambda: speedup)
    monkeypatch.setenv("COATNET_AUTO_PRECISION", forced)
    precision, why = resolve_precision("auto", CPU)
    assert precision == forced and "COATNET_AUTO_PRECISION" in why
    assert resolve_precision("fp32" if forced == "bf16" else "bf16", CPU)[1] == "asked for"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", CUDA)[0] == "bf16"


def test_a_bad_forced_precision_is_named(monkeypatch):
    monkeypatch.setenv("COATNET_AUTO_PRECISION", "fp16")
    with pytest.raises(ValueError, match="COATNET_AUTO_PRECISION='fp16'"):
        resolve_precision("auto", CPU)


@pytest.mark.parametrize("forced", ["fp32", "bf16"])
def test_training_takes_the_forced_precision_path(monkeypatch, tmp_path, colour_images, forced):
    """Both training paths run on every CPU: a short run with precision auto under each forced value records
    it, and its bf16 run computes in bf16 (the logits' dtype inside the step), its fp32 run in fp32."""
    from coatnet.train import TrainConfig, train
    from coatnet.train import engine

    monkeypatch.setenv("COATNET_AUTO_PRECISION", forced)
    seen = []
    real = engine.create_model

    def create(*args, **kwargs):  # the run's model, its forward outputs' dtypes recorded
        model = real(*args, **kwargs)
        model.register_forward_hook(lambda module, inputs, out: seen.append(out.dtype))
        return model

    monkeypatch.setattr(engine, "create_model", create)
    res = train(TrainConfig(model="coatnet_nano", data=str(colour_images), img_size=32, epochs=1, batch_size=24,
                            val_fraction=0.25, workers=0, threads=1, progress=False, quiet=True, precise_bn=0))
    assert res["precision"] == forced and math.isfinite(res["train_loss"])
    steps = seen[:res["steps"]]  # the training forwards come first (evaluation then runs the fp32 inference model)
    assert len(steps) == 3 and set(steps) == {torch.bfloat16 if forced == "bf16" else torch.float32}


def test_bf16_matmul_speedup_is_a_positive_ratio():
    assert 0.01 < bf16_cpu.bf16_matmul_speedup() < 100


@pytest.mark.parametrize("supported, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_on_cuda_follows_the_gpu(monkeypatch, supported, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)
    assert resolve_precision("auto", CUDA)[0] == expected


@pytest.mark.parametrize("asked", ["fp32", "bf16"])
def test_explicit_precision_is_kept_on_every_device(monkeypatch, asked):
    monkeypatch.setattr(bf16_cpu, "cpu_has_native_bf16", lambda: asked == "fp32")  # the opposite of what auto says
    assert resolve_precision(asked, CPU) == (asked, "asked for")
    assert resolve_precision(asked, CUDA) == (asked, "asked for")


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision='fp16'"):
        resolve_precision("fp16", CPU)


def test_setup_runtime_resolves_auto(monkeypatch):
    monkeypatch.delenv("COATNET_AUTO_PRECISION", raising=False)
    monkeypatch.setattr(bf16_cpu, "cpu_has_native_bf16", lambda: False)
    runtime = setup_runtime("cpu", "auto", threads=1)
    assert runtime.precision == "fp32" and "no bf16 instructions" in runtime.precision_reason


class _LeftRight(torch.nn.Module):
    """Logits (left half mean, right half mean) of a one-channel image: mirroring swaps them."""

    def forward(self, x):
        w = x.shape[-1] // 2
        return torch.stack([x[..., :w].mean((1, 2, 3)), x[..., w:].mean((1, 2, 3))], dim=1) * 10


def test_flip_evaluation_averages_the_probabilities_of_image_and_mirror():
    images = torch.zeros(4, 1, 4, 4, dtype=torch.uint8)
    images[:, :, :, :2] = torch.tensor([255, 200, 100, 0], dtype=torch.uint8).view(4, 1, 1, 1)  # left halves
    labels = torch.tensor([0, 0, 1, 1])
    spec = DataSpec("t", ("left", "right"), 1, 4, 1.0, (0.0,), (1.0,))
    runtime = setup_runtime("cpu", "fp32", threads=1)
    source = TensorSource(images, labels)
    plain = evaluate(_LeftRight(), source, torch.arange(4), spec, runtime, batch_size=3)
    flipped = evaluate(_LeftRight(), source, torch.arange(4), spec, runtime, batch_size=3, tta_flip=True)
    x = images.float() / 255
    p = (_LeftRight()(x).softmax(-1) + _LeftRight()(x.flip(-1)).softmax(-1)) / 2
    assert torch.allclose(p, torch.full_like(p, 0.5))  # this model's mirror votes exactly against it
    assert flipped["loss"] == pytest.approx(-p[torch.arange(4), labels].log().mean().item(), rel=1e-6)
    assert plain["top1"] == 50.0 and plain["loss"] > flipped["loss"]
