"""The device audit (coatnet/device_plan.py): every device-specific choice, with the device type as an
argument, and the places that follow it. No GPU needed: the decisions are pure functions of the device type
and the hardware's abilities."""
import pytest
import torch
from torch import nn

import coatnet
from coatnet.device_plan import device_plan
from coatnet.export import export
from coatnet.models.blocks import BatchNormChannelsLast, TransformerBlock
from coatnet.models.inference import InferenceMBConv, InferenceTransformer
from coatnet.train.distributed import (SyncBatchNorm, SyncBatchNormChannelsLast, TorchSyncBatchNorm,
                                       TorchSyncBatchNormChannelsLast, convert_sync_batchnorm)
from coatnet.train.optim import build_optimizer
from coatnet.train.runtime import Runtime, plan_for


def test_cuda_takes_the_cuda_path_everywhere():
    plan = device_plan("cuda", cuda_bf16=True, cpu_native_bf16=False, onednn_fusion=True)
    assert plan.dist_backend == "cpu:gloo,cuda:nccl"  # NCCL for CUDA tensors, gloo for the CPU's metric sums
    assert plan.sync_batchnorm == "torch"
    assert plan.pin_memory and plan.non_blocking
    assert plan.fused_optimizer and plan.tf32
    assert plan.auto_precision == "bf16"
    # none of the CPU measures, whatever the CPU and the torch build can do
    assert not (plan.bf16_cpu_kernels or plan.onednn_fusion or plan.chunk_large_maps or plan.reuse_freed_memory)


def test_a_gpu_without_bf16_trains_in_fp32_under_auto():
    assert device_plan("cuda", cuda_bf16=False).auto_precision == "fp32"


def test_deterministic_runs_turn_tf32_off():
    assert not device_plan("cuda", deterministic=True).tf32


@pytest.mark.parametrize("native, precision, swap", [(True, "measure", False), (False, "fp32", True)])
def test_cpu_keeps_its_own_measures(native, precision, swap):
    plan = device_plan("cpu", cpu_native_bf16=native, onednn_fusion=True)
    assert plan.dist_backend == "gloo" and plan.sync_batchnorm == "coatnet"
    assert not plan.pin_memory and not plan.non_blocking and not plan.tf32
    assert plan.onednn_fusion and plan.chunk_large_maps and plan.reuse_freed_memory and plan.fused_optimizer
    assert plan.auto_precision == precision and plan.bf16_cpu_kernels == swap


def test_cpu_without_onednn_fusion_uses_plain_kernels():
    assert not device_plan("cpu", onednn_fusion=False).onednn_fusion


@pytest.mark.parametrize("device_type", ["mps", "xpu", "meta"])
def test_other_devices_take_torchs_generic_paths(device_type):
    plan = device_plan(device_type, cpu_native_bf16=True, onednn_fusion=True)
    assert plan.dist_backend == "gloo" and plan.sync_batchnorm == "coatnet" and plan.auto_precision == "fp32"
    assert not (plan.fused_optimizer or plan.pin_memory or plan.bf16_cpu_kernels or plan.onednn_fusion
                or plan.chunk_large_maps or plan.reuse_freed_memory)


def test_the_runtime_reads_the_plan_of_its_device():
    runtime = Runtime(torch.device("cpu"), "fp32", False, False, deterministic=True)
    assert runtime.plan == plan_for(torch.device("cpu"), True)
    assert runtime.plan.device_type == "cpu"
    x = torch.randn(2, 3)
    assert runtime.to_device(x) is x  # CPU: no pinning, no copy


def _nano():
    return coatnet.create_model("coatnet_nano", num_classes=10, img_size=32, in_chans=1)


@pytest.mark.parametrize("kind, plain, channels_last", [("torch", TorchSyncBatchNorm, TorchSyncBatchNormChannelsLast),
                                                         ("coatnet", SyncBatchNorm, SyncBatchNormChannelsLast)])
def test_sync_batchnorm_kind_keeps_parameters_keys_and_layout(kind, plain, channels_last):
    model = nn.Sequential(nn.BatchNorm2d(4), BatchNormChannelsLast(4))
    params = list(model.parameters())
    keys = list(model.state_dict())
    convert_sync_batchnorm(model, kind)
    assert type(model[0]) is plain and type(model[1]) is channels_last
    assert all(a is b for a, b in zip(model.parameters(), params))  # an optimizer built before still updates them
    assert list(model.state_dict()) == keys
    x = torch.randn(3, 4, 5, 5)
    model.eval()
    assert torch.allclose(model[1](x.permute(0, 2, 3, 1)), model[0](x).permute(0, 2, 3, 1), atol=1e-6)


def test_sync_batchnorm_kind_follows_the_models_device():
    model = _nano()
    convert_sync_batchnorm(model)  # on the CPU: ours, which runs on gloo
    kinds = {type(m) for m in model.modules() if isinstance(m, (SyncBatchNorm, nn.SyncBatchNorm))}
    assert kinds and kinds <= {SyncBatchNorm, SyncBatchNormChannelsLast}
    with pytest.raises(ValueError, match="'cudnn' is not one of torch, coatnet"):
        convert_sync_batchnorm(_nano(), "cudnn")


def test_torch_sync_batchnorm_updates_running_statistics_once_under_checkpointing():
    torch.manual_seed(0)
    plain, synced = nn.BatchNorm2d(3), convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(3)), "torch")[0]
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    plain(x)  # one update: what a step should leave
    torch.utils.checkpoint.checkpoint(synced, x, use_reentrant=False).sum().backward()  # forward + recompute
    assert torch.allclose(synced.running_mean, plain.running_mean) and torch.allclose(synced.running_var,
                                                                                       plain.running_var)
    assert int(synced.num_batches_tracked) == 1


def test_inference_model_takes_the_plan_of_the_models_device():
    model = _nano().eval()
    on_cpu = coatnet.inference_model(model)
    mbconv = [m for m in on_cpu.modules() if isinstance(m, InferenceMBConv)]
    assert mbconv and all(m.chunk_large_maps for m in mbconv)
    if device_plan("cpu", onednn_fusion=coatnet.models.inference.onednn_fusion_available()).onednn_fusion:
        assert any(isinstance(m, InferenceTransformer) for m in on_cpu.modules())
    # A model on another device (meta: shapes only, as a GPU would be without one here) gets no CPU measures:
    # no batch chunking, no oneDNN blocks; its Transformer blocks stay torch's SDPA path.
    elsewhere = coatnet.inference_model(model.to("meta"))
    mbconv = [m for m in elsewhere.modules() if isinstance(m, InferenceMBConv)]
    assert mbconv and not any(m.chunk_large_maps for m in mbconv)
    assert not any(isinstance(m, InferenceTransformer) for m in elsewhere.modules())
    assert any(isinstance(m, TransformerBlock) for m in elsewhere.modules())


def test_export_leaves_the_callers_model_on_its_device_and_dtype(tmp_path):
    pytest.importorskip("onnx")
    model = _nano().eval().to(torch.bfloat16)  # stands for a CUDA model: export must not move or cast it
    export(model, tmp_path / "m.onnx", "onnx")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert (tmp_path / "m.onnx").stat().st_size > 0


@pytest.mark.parametrize("device_type, fused", [("cpu", True), ("meta", False)])
def test_adamw_is_fused_where_the_plan_says(device_type, fused):
    optimizer = build_optimizer(_nano().to(device_type), lr=1e-3, weight_decay=0.05)
    assert bool(optimizer.defaults.get("fused")) == fused
    assert bool(optimizer.defaults.get("foreach")) != fused
