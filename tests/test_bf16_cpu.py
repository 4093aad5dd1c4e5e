"""bf16 linears and convolutions through fp32 kernels (layers/bf16_cpu.py): the numbers of a bf16 kernel with
fp32 accumulation, forward and backward."""
import pytest
import torch
import torch.nn.functional as F

import coatnet
from coatnet.layers import bf16_cpu
from coatnet.layers.bf16_cpu import Conv2d, Linear, use_bf16_cpu_kernels
from coatnet.train.runtime import setup_runtime

BF16 = torch.bfloat16


def exact_reference(fn, *tensors):
    """fn in float64 on the bf16-rounded operands, result rounded to bf16: a bf16 kernel with exact sums."""
    return fn(*(t.to(BF16).double() for t in tensors)).to(BF16)


@pytest.fixture
def emulate(monkeypatch):
    monkeypatch.setattr(bf16_cpu, "emulated_bf16_cpu", lambda: True)


def ulps_apart(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference in units of bf16's last place of b (relative to the tensor's scale)."""
    return float((a.detach().double() - b.detach().double()).abs().max() / (b.detach().double().abs().max() * 2.0**-8))


@pytest.mark.parametrize("module", ["linear", "conv", "strided conv"])
def test_forward_and_gradients_are_those_of_a_bf16_kernel(emulate, module):
    torch.manual_seed(0)
    if module == "linear":
        layer, x = Linear(48, 40), torch.randn(3, 5, 48)
        fn = lambda x, w, b: F.linear(x, w, b)  # noqa: E731
    else:
        stride = 2 if module == "strided conv" else 1
        layer, x = Conv2d(8, 16, 3, stride, 1), torch.randn(2, 8, 9, 9).contiguous(memory_format=torch.channels_last)
        fn = lambda x, w, b: F.conv2d(x, w, b, stride, 1)  # noqa: E731
    x.requires_grad_(True)
    with torch.autocast("cpu", dtype=BF16):
        y = layer(x)
    assert y.dtype == BF16
    ref = exact_reference(fn, x.detach(), layer.weight.detach(), layer.bias.detach())
    assert ulps_apart(y, ref) <= 1.0  # at most one rounding step from the exactly summed result
    # gradients: x, weight and bias, each within a bf16 rounding of the float64 gradient on bf16 operands
    g = torch.randn_like(y, dtype=torch.float32).to(BF16)
    y.backward(g)
    ops = [t.detach().to(BF16).double().requires_grad_(True) for t in (x, layer.weight, layer.bias)]
    fn(*ops).backward(g.double())
    for got, want in zip((x.grad, layer.weight.grad, layer.bias.grad), ops):
        assert got.dtype == torch.float32
        assert ulps_apart(got, want.grad) <= 2.0


def test_torch_kernels_are_used_where_bf16_is_native_or_autocast_is_off(monkeypatch):
    calls = []
    monkeypatch.setattr(bf16_cpu._LinearBf16, "apply", lambda *a: calls.append(1) or F.linear(*a))
    layer, x = Linear(4, 3), torch.randn(2, 4)
    monkeypatch.setattr(bf16_cpu, "emulated_bf16_cpu", lambda: False)
    with torch.autocast("cpu", dtype=BF16):
        layer(x)
    layer(x)
    assert not calls
    monkeypatch.setattr(bf16_cpu, "emulated_bf16_cpu", lambda: True)
    layer(x)  # fp32 outside autocast: torch's kernel
    with torch.autocast("cpu", dtype=BF16):
        layer(x)
    assert calls == [1]


def test_a_bf16_training_step_matches_torchs_own_bf16_kernels(monkeypatch):
    # The whole network, one forward and backward under bf16 autocast: the loss and every gradient agree
    # with torch's bf16 kernels to bf16 precision (the kernels differ only in the order of their sums).
    torch.manual_seed(0)
    model = use_bf16_cpu_kernels(coatnet.create_model("coatnet_pico", num_classes=10, img_size=32).train())
    x, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 3, 5, 9])
    results = {}
    for emulated in (False, True):
        monkeypatch.setattr(bf16_cpu, "emulated_bf16_cpu", lambda e=emulated: e)
        model.zero_grad()
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=BF16):
            loss = F.cross_entropy(model(x).float(), labels)
        loss.backward()
        results[emulated] = (loss.item(),
                             {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (l0, g0), (l1, g1) = results[False], results[True]
    assert l1 == pytest.approx(l0, rel=2e-2)
    assert g0.keys() == g1.keys()
    rel = sorted(float((g1[k] - g0[k]).norm() / g0[k].norm().clamp_min(1e-12)) for k in g0)
    assert rel[len(rel) // 2] < 0.05  # bf16 noise, not a different computation


def test_the_kernel_swap_keeps_parameters_state_dict_and_outputs():
    torch.manual_seed(0)
    model = coatnet.create_model("coatnet_pico", num_classes=10, img_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    params, state = list(model.parameters()), {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(x)
    assert use_bf16_cpu_kernels(model) is model
    assert all(p is q for p, q in zip(model.parameters(), params, strict=True))
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(x), before)  # outside bf16 autocast the subclasses run torch's kernels
    kinds = {name: type(m) for name, m in model.named_modules()}
    assert kinds["stages.0.blocks.0.conv1"] is Conv2d and kinds["stages.2.blocks.0.mlp.fc1"] is Linear
    assert kinds["stages.2.blocks.0.attn.qkv"] is Linear and kinds["head"] is Linear
    # depthwise convolutions and squeeze-excite keep torch's bf16 kernels
    assert kinds["stages.0.blocks.0.conv2"] is torch.nn.Conv2d and kinds["stages.0.blocks.0.se.fc1"] is torch.nn.Conv2d


@pytest.mark.parametrize("precision, emulated, swapped", [("bf16", True, True), ("bf16", False, False),
                                                          ("fp32", True, False)])
def test_the_runtime_swaps_the_kernels_in_only_for_emulated_bf16(monkeypatch, precision, emulated, swapped):
    monkeypatch.setattr(bf16_cpu, "emulated_bf16_cpu", lambda: emulated)
    model = setup_runtime("cpu", precision).prepare(coatnet.create_model("coatnet_pico", num_classes=10))
    assert (type(model.head) is Linear) == swapped


def test_compiling_under_cpu_bf16_autocast_warns_nothing_and_breaks_no_graph():
    # `coatnet train --compile` in bf16 on a CPU: the kernel choice is read as a constant, not traced through a
    # cache wrapper (which made torch.compile print a UserWarning to the user in every compiled run).
    import warnings

    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.warn_once_cache.clear()
    layer = Linear(16, 8)

    def step(x):
        with torch.autocast("cpu", dtype=BF16):
            return layer(x)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        explained = torch._dynamo.explain(step)(torch.randn(4, 16))
        out = torch.compile(step, backend="eager")(torch.randn(4, 16))
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    assert out.dtype == BF16
    assert not [str(w.message) for w in caught if "lru_cache" in str(w.message)]
