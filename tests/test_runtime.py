"""Runtime decisions (train/runtime.py): the precision `auto` picks per device and hardware, and the
evaluation's test-time flip."""
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
    monkeypatch.setattr(bf16_cpu, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(bf16_cpu, "bf16_matmul_speedup", lambda: speedup)
    precision, why = resolve_precision("auto", CPU)
    assert precision == expected and why.startswith("auto:")
    assert (f"{speedup:.2f}x" in why) == native  # the measurement is named when it decided


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
    flipped = evaluate(_LeftRight(), source, torch.arange(4), spec, runtime, batch_size=3, flip=True)
    x = images.float() / 255
    p = (_LeftRight()(x).softmax(-1) + _LeftRight()(x.flip(-1)).softmax(-1)) / 2
    assert torch.allclose(p, torch.full_like(p, 0.5))  # this model's mirror votes exactly against it
    assert flipped["loss"] == pytest.approx(-p[torch.arange(4), labels].log().mean().item(), rel=1e-6)
    assert plain["top1"] == 50.0 and plain["loss"] > flipped["loss"]
