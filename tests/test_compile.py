"""The eager model is plain PyTorch: torch.jit.script, torch.fx.symbolic_trace and torch.export (with a
dynamic batch) accept it and compute what it computes; `inference_model` exports too."""
import pytest
import torch

import coatnet

SMALL = dict(depths=(1, 1, 1, 2, 1), widths=(16, 16, 32, 64, 128), head_dim=16, num_classes=5)
MODELS = {
    "coatnet_nano at 224": lambda: coatnet.create_model("coatnet_nano", img_size=224),  # table, BatchNorm
    "mlp bias, LayerNorm, post-softmax bias": lambda: coatnet.create_model(
        "coatnet_pico", **SMALL, img_size=64, attention_bias="relative_post",
        **{"transformer.relative_bias": "mlp", "transformer.relative_mlp_width": 16}),
}


@pytest.fixture(params=list(MODELS), scope="module")
def model_and_input(request):
    torch.manual_seed(0)
    model = MODELS[request.param]().eval()
    x = torch.randn(3, model.in_chans, *model.config.image_size)
    with torch.no_grad():
        expected = model(x)
    return model, x, expected


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_torch_jit_script_compiles_the_model(model_and_input):
    model, x, expected = model_and_input
    scripted = torch.jit.script(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), expected, rtol=1e-5, atol=1e-5)


def test_torch_fx_traces_the_model(model_and_input):
    model, x, expected = model_and_input
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), expected, rtol=1e-5, atol=1e-5)
    leaves = {getattr(n.target, "__name__", "") for n in traced.graph.nodes}
    assert {"check_input", "attention", "gather_bias"} <= leaves  # the shape-dependent helpers stay calls


def test_torch_export_with_a_dynamic_batch(model_and_input):
    model, x, expected = model_and_input
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(program.module()(x[:2]), model(x[:2]), rtol=1e-5, atol=1e-5)


def test_inference_model_exports_with_a_dynamic_batch(model_and_input):
    model, x, expected = model_and_input
    fast = coatnet.inference_model(model)
    program = torch.export.export(fast, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("mkldnn" in op for op in ops)  # the fused oneDNN kernels give way to standard ops
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(program.module()(x[:2]), model(x[:2]), rtol=1e-4, atol=1e-4)


def test_cpu_and_meta_models_count_the_same_multiply_adds():
    # torch's fused CPU attention kernel has no FLOP formula of its own (models/flops.py gives it one)
    from coatnet.models import build_on_meta, count_macs, get_config

    config = get_config("coatnet_pico", **SMALL, img_size=64)
    torch.manual_seed(0)
    on_cpu = coatnet.models.CoAtNet(config)
    assert count_macs(on_cpu) == count_macs(build_on_meta(config)) > 0
    with torch.no_grad():  # the CPU model's attention does take the fused kernel
        kernels = []

        class Record(torch.utils._python_dispatch.TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kernels.append(str(func))
                return func(*args, **(kwargs or {}))

        with Record():
            on_cpu.eval()(torch.zeros(1, 3, 64, 64))
    assert any("flash_attention_for_cpu" in k for k in kernels)
