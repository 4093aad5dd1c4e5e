"""The benchmark tool, export, and the speed-oriented inference model (no timed assertions)."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import coatnet
from coatnet.bench import (benchmark, count_step_flops, make_step, peak_memory_bytes, resolve_device,
                           time_interleaved, timm_model)
from coatnet.cli import main
from coatnet.export import export, load_checkpoint_model, max_relative_error, run_exported
from coatnet.models.inference import InferenceMBConv

TINY = dict(depths=(1, 1, 1, 1, 1), widths=(16, 16, 32, 32, 64), head_dim=16, num_classes=7, img_size=32)


def tiny(**kw):
    return coatnet.create_model("coatnet_pico", **{**TINY, **kw}).eval()


def trained_stats(model):
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, 32, 32) * 2 + 1)
    return model.eval()


# -- inference model ---------------------------------------------------------------------------------
@pytest.mark.parametrize("fuse, channels_last", [(True, True), (False, False), (True, False)])
def test_inference_model_variants_match_the_eval_model(fuse, channels_last):
    model = trained_stats(tiny(downsample="dwconv"))
    fast = coatnet.inference_model(model, channels_last=channels_last, fuse_kernels=fuse)
    x = torch.randn(3, 3, 64, 32)
    ref = model(x)
    for inp in (x, x.contiguous(memory_format=torch.channels_last)):
        assert (fast(inp) - ref).abs().max() <= 1e-4 * ref.abs().max()


@pytest.mark.parametrize("overrides", [
    {"transformer.norm": "batchnorm", "pool_type": "max"},
    {"transformer.norm": "layernorm", "pool_type": "avg", "transformer.layer_scale": 0.5},
    {"transformer.attention_bias": "relative_post", "pool_type": "max3x3"},
    {"transformer.attention_bias": "none", "transformer.widen_in": "proj"},
])
def test_inference_transformer_blocks_fold_norms_layer_scale_and_residuals_exactly(overrides):
    from coatnet.models.inference import InferenceTransformer

    torch.manual_seed(0)
    model = tiny(**overrides)
    with torch.no_grad():  # norms and layer scales away from their initial identity
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(-1.5, 1.5), m.bias.uniform_(-0.5, 0.5)
            if type(m).__name__ == "LayerScale":
                m.gamma.uniform_(0.5, 1.5)
    model = trained_stats(model)
    fast = coatnet.inference_model(model)
    blocks = [m for m in fast.modules() if isinstance(m, InferenceTransformer)]
    assert len(blocks) == (2 if coatnet.models.inference.onednn_fusion_available() else 0)
    x = torch.randn(3, 3, 64, 32)
    ref = model(x)
    assert (fast(x) - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_inference_mbconv_cuts_large_batches_into_chunks_with_the_same_result(monkeypatch):
    model = trained_stats(tiny(downsample="dwconv"))
    fast = coatnet.inference_model(model)
    x = torch.randn(5, 3, 64, 32)
    whole = fast(x)
    calls = []
    original = InferenceMBConv._forward
    monkeypatch.setattr(InferenceMBConv, "_forward", lambda self, part: calls.append(len(part)) or original(self, part))
    monkeypatch.setattr(InferenceMBConv, "max_expanded_bytes", 1)  # one image at a time
    chunked = fast(x)
    assert calls == [1] * 5 * 2  # two MBConv blocks, five images each
    assert (chunked - whole).abs().max() <= 1e-5 * whole.abs().max()
    assert (chunked - model(x)).abs().max() <= 1e-4 * whole.abs().max()


def test_inference_model_folds_squeeze_excite_into_the_projection_when_fused():
    fast = coatnet.inference_model(tiny(), fuse_kernels=True)
    blocks = [m for m in fast.modules() if isinstance(m, InferenceMBConv)]
    assert len(blocks) == 2
    expected = coatnet.models.inference.onednn_fusion_available()
    assert all(b.fuse_se == expected for b in blocks)
    assert not any(b.fuse_se for b in coatnet.inference_model(tiny(), fuse_kernels=False).modules()
                   if isinstance(b, InferenceMBConv))


def test_inference_model_runs_under_bf16_autocast():
    model = tiny()
    fast = coatnet.inference_model(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fast(x)
    ref = model(x)
    assert out.dtype == torch.bfloat16 and (out.float() - ref).abs().max() <= 0.1 * ref.abs().max()


def test_the_package_never_imports_timm():
    code = ("import sys, coatnet, coatnet.bench, coatnet.export, coatnet.cli.perf; "
            "assert 'timm' not in sys.modules and 'torchvision' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- measuring ---------------------------------------------------------------------------------------
def test_peak_memory_counts_live_tensors_created_during_the_call():
    def step():
        a = torch.ones(1024, 1024)  # 4 MiB
        b = a * 2  # 4 MiB more while a lives
        del a, b
        torch.ones(512, 1024)  # 2 MiB after both died: below the peak

    assert peak_memory_bytes(step, torch.device("cpu")) == 8 * 2**20


def test_peak_memory_of_a_training_step_holds_the_saved_activations():
    layer = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.GELU(), torch.nn.Linear(256, 1))
    x = torch.randn(4096, 256)
    inference = peak_memory_bytes(make_step(layer, x, "fp32", False, 1), torch.device("cpu"))
    training = peak_memory_bytes(make_step(layer, x, "fp32", True, 1), torch.device("cpu"))
    activation = 4096 * 256 * 4
    assert inference >= 2 * activation and training >= 3 * activation and training > inference


def test_flops_of_a_linear_layer_forward_and_training_step():
    layer = torch.nn.Linear(64, 32)
    x = torch.randn(5, 64)
    assert count_step_flops(layer, x, train=False) == 2 * 5 * 64 * 32
    # forward and the weight gradient (the input needs none)
    assert count_step_flops(layer, x, train=True) == 2 * 2 * 5 * 64 * 32


@pytest.mark.parametrize("groups", [1, 8])
@pytest.mark.parametrize("transposed", [False, True])
def test_a_grouped_convolutions_weight_gradient_costs_what_its_forward_does(groups, transposed):
    # torch's own formula counted a depthwise convolution's weight gradient as a dense one's (groups times
    # too many): coatnet_mini's training step came to 10.3x its forward instead of 3x.
    conv = (torch.nn.ConvTranspose2d(8, 16, 3, stride=2, groups=groups) if transposed
            else torch.nn.Conv2d(8, 16, 3, padding=1, groups=groups))
    x = torch.randn(2, 8, 6, 6)
    forward = count_step_flops(conv, x, train=False)
    # 2 FLOPs x batch 2 x 6x6 positions (the input's, for the transposed one) x 3x3 taps x 16 x 8 / groups pairs
    assert forward == 2 * 2 * 6 * 6 * 9 * 16 * 8 // groups
    # the input needs no gradient: forward + the weight gradient, which costs what the forward does
    assert count_step_flops(conv, x, train=True) == 2 * forward


def test_a_coatnet_training_step_counts_three_forwards():
    model = coatnet.create_model("coatnet_mini")
    x = torch.randn(1, model.in_chans, 32, 32)
    forward, training = count_step_flops(model, x, train=False), count_step_flops(model, x, train=True)
    # forward, input gradients and weight gradients, less the stem's input gradient (the image needs none)
    assert 2.9 * forward < training <= 3 * forward


def test_time_interleaved_alternates_the_steps():
    calls = []
    steps = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = time_interleaved(steps, torch.device("cpu"), warmup=1, repeats=3)
    assert calls == ["a", "b"] * 4 and all(len(v) == 3 for v in times.values())


def test_benchmark_reports_consistent_numbers():
    r = benchmark("coatnet_pico", batch=2, img_size=32, threads=torch.get_num_threads(),
                  overrides=TINY | {"img_size": None}, warmup=1, repeats=2)
    m = r.ours
    assert m.macs_per_image == coatnet.count_macs(tiny(), img_size=32)
    assert m.images_per_s == pytest.approx(2 / (m.latency_ms / 1e3))
    assert m.gflops == pytest.approx(2 * m.macs_per_image * m.images_per_s / 1e9)
    assert m.peak_memory_mb > 0 and r.matmul_gflops > 0 and r.timm is None and r.ratios is None


def test_benchmark_of_a_training_step_in_bf16():
    r = benchmark("coatnet_pico", batch=2, img_size=32, precision="bf16", train=True,
                  overrides=TINY | {"img_size": None}, warmup=1, repeats=1)
    assert r.ours.images_per_s > 0 and r.ours.gflops > 2 * r.ours.macs_per_image * r.ours.images_per_s / 1e9


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present")
def test_cuda_without_cuda_is_a_clear_error(capsys):
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")
    assert main(["bench", "--model", "coatnet_pico", "--device", "cuda"]) == 1
    assert "error: --device cuda: CUDA is not available" in capsys.readouterr().err


def test_compare_timm_without_timm_is_a_one_line_error():
    try:
        import timm  # noqa: F401
        pytest.skip("timm is installed here")
    except ImportError:
        pass
    with pytest.raises(ValueError, match="--compare-timm needs timm"):
        timm_model("coatnet_0_224")


def test_bench_cli_prints_json(capsys):
    assert main(["bench", "--model", "coatnet_pico", "--img-size", "32", "--batch", "1", "2", "--repeats", "1",
                 "--warmup", "0", "--threads", "1", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [d["settings"]["batch"] for d in lines] == [1, 2]
    assert all(d["ours"]["images_per_s"] > 0 and d["settings"]["threads"] == 1 for d in lines)


def test_bench_model_args_change_the_model_it_times(capsys):
    # the Fashion-MNIST recipe's full-resolution stem, as `coatnet train --model-arg` builds it
    args = ["bench", "--model", "coatnet_mini", "--img-size", "32", "--repeats", "1", "--warmup", "0", "--json"]
    assert main(args) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(args + ["--model-arg", "stem_stride=1", "strides=2,2,2,1", "--model-arg", "num_classes=10"]) == 0
    stem = json.loads(capsys.readouterr().out)
    assert stem["settings"]["overrides"] == {"stem_stride": 1, "strides": [2, 2, 2, 1], "num_classes": 10}
    # S0 at 32x32 instead of 16x16 (63.6M against 46.1M multiply-adds with 3 channels and 1,000 classes)
    assert stem["ours"]["macs_per_image"] > 1.3 * plain["ours"]["macs_per_image"]
    # one setting, one flag: the stride's place and the input size have their own
    assert main(["bench", "--model", "coatnet_mini", "--downsample", "dwconv", "--model-arg",
                 "mbconv.downsample=conv1x1"]) == 1
    assert "mbconv.downsample is set by --downsample" in capsys.readouterr().err
    assert main(["bench", "--model", "coatnet_mini", "--model-arg", "stem_stride"]) == 1
    assert "is not KEY=VALUE" in capsys.readouterr().err


def test_bench_input_pipeline_times_a_jpeg_folder_and_shards_per_worker(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # as where timm is not installed: its side is skipped, said why
    assert main(["bench", "--input-pipeline", "--images", "8", "--img-size", "32", "--batch", "2", "--workers", "1",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["settings"]["augment"]["randaugment_n"] == 2 and result["settings"]["augment"]["mixup_alpha"] == 0.8
    assert set(result["pipelines"]) == {"ours:folder", "ours:shards"}
    for p in result["pipelines"].values():  # two passes of 4 batches; the second timed after its first batch
        assert p["images"] == 6 and p["images_per_s"] > 0 and p["per_worker"] == p["images_per_s"]
    assert "timm is not importable" in result["skipped"]["timm:folder"] and result["ratios"] == {}


def test_bench_without_a_model_or_the_input_pipeline_says_what_it_needs(capsys):
    assert main(["bench"]) == 1
    assert "needs --model" in capsys.readouterr().err


# -- export ------------------------------------------------------------------------------------------
def write_training_checkpoint(model, path):
    info = {"model_config": model.config.to_dict(), "epoch": 1}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"format": "coatnet-checkpoint-v1", "coatnet": json.dumps(info)})


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_matches_pytorch_at_batch_1_and_3(tmp_path, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    model = trained_stats(tiny())
    ckpt = tmp_path / "checkpoint-best.safetensors"
    write_training_checkpoint(model, ckpt)
    loaded = load_checkpoint_model(ckpt)
    out = export(loaded, tmp_path / f"model.{fmt}", fmt)
    for b in (1, 3):
        x = torch.randn(b, 3, 32, 32)
        got = run_exported(out, fmt, x)
        ref = model(x)
        assert got.shape == (b, 7) and (got - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert max_relative_error(model, out, fmt) <= 1e-4


def test_export_cli_with_plain_weights_needs_the_model_name(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    model = coatnet.create_model("coatnet_pico", num_classes=3, img_size=32)
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    assert main(["export", "--checkpoint", str(weights), "--format", "onnx"]) == 1
    assert "name the architecture with --model" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(weights), "--format", "onnx", "--model", "coatnet_pico",
                 "--num-classes", "3", "--img-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "max relative difference" in out and (tmp_path / "w.onnx").is_file()


def test_export_rejects_an_unknown_format(tmp_path):
    with pytest.raises(ValueError, match="format 'tflite' is not one of"):
        export(tiny(), tmp_path / "m", "tflite")
