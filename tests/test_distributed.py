"""Data-parallel training: batch slicing, synchronized BatchNorm, DDP and FSDP with 2 CPU processes (gloo)
agree with one process on the same global batch."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from coatnet.models.blocks import BatchNormChannelsLast
from coatnet.train import distributed as D
from coatnet.train.redundant import redundant_parameters

WORKER = Path(__file__).with_name("distributed_worker.py")


def _worker_module():
    spec = importlib.util.spec_from_file_location("distributed_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def torchrun(script: Path, *args: str, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `script` under torchrun with `nproc` CPU processes on a free port; fail the test on error."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                          os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(script), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def worst_rel_err(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> tuple[float, str]:
    """Largest |got - ref| / |ref| over the floating-point tensors of a state dict, and its key."""
    errs = {k: float((got[k].double() - ref[k].double()).norm() / ref[k].double().norm().clamp_min(1e-12))
            for k in ref if ref[k].is_floating_point()}
    key = max(errs, key=errs.get)
    return errs[key], key


# -- one process ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,world", [(6, 2), (7, 2), (6, 4), (128, 3), (9, 5), (128, 8)])
def test_rank_slices_tile_the_global_batch_in_order_at_even_offsets(size, world):
    slices = [D.rank_slice(size, r, world) for r in range(world)]
    assert [i for s in slices for i in range(size)[s]] == list(range(size))
    assert all(s.start % 2 == 0 for s in slices)  # Mixup pairs (0, 1), (2, 3), ... stay on one rank
    lengths = [s.stop - s.start for s in slices]
    assert max(lengths) - min(lengths) <= 2


def test_a_batch_smaller_than_twice_the_world_leaves_the_last_ranks_empty():
    assert [D.rank_slice(3, r, 4) for r in range(4)] == [slice(0, 2), slice(2, 3), slice(3, 3), slice(3, 3)]
    assert D.shard(torch.arange(10, 16), 1, 2).tolist() == [14, 15]


def test_loss_scale_turns_the_mean_over_ranks_into_the_global_mean():
    losses = torch.rand(7, dtype=torch.float64)
    world = 3
    parts = [losses[D.rank_slice(7, r, world)] for r in range(world)]
    mean_over_ranks = sum(D.loss_scale(len(p), 7, world) * p.mean() for p in parts) / world
    assert mean_over_ranks.item() == pytest.approx(losses.mean().item(), rel=1e-12)


def test_without_torchrun_there_is_one_process_and_no_group(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    env = D.init_distributed()
    assert (env.rank, env.world_size, env.is_main, env.is_distributed) == (0, 1, True, False)
    assert D.all_reduce_sums({"a": 2}) == {"a": 2.0} and D.all_reduce_sums([1, 2]) == [1.0, 2.0]
    assert D.rank_and_world() == (0, 1) and D.is_main()
    assert D.broadcast_object("x") == "x"


def test_a_bad_rank_in_the_environment_is_reported(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "two")
    with pytest.raises(ValueError, match="RANK"):
        D.init_distributed()


def test_convert_sync_batchnorm_keeps_layout_state_and_keys():
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(4), BatchNormChannelsLast(4))
    for bn in model:
        bn.running_mean.uniform_(), bn.weight.data.uniform_()
    x = torch.randn(2, 4, 3, 3)
    expected = model[1](model[0](x).permute(0, 2, 3, 1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = list(model.parameters())
    D.convert_sync_batchnorm(model)
    assert all(a is b for a, b in zip(model.parameters(), params))  # an existing optimizer keeps working
    assert type(model[0]) is D.SyncBatchNorm and type(model[1]) is D.SyncBatchNormChannelsLast
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    model.train()
    torch.testing.assert_close(model[1](model[0](x).permute(0, 2, 3, 1)), expected)


# -- two processes -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    torchrun(WORKER, str(out), nproc=2)
    return out, json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_collectives_sum_over_ranks_and_broadcast_from_rank_0(two_process_run):
    _, r = two_process_run
    assert (r["world_size"], r["backend"]) == (2, "gloo")
    assert (r["sum_of_ranks"], r["count"], r["broadcast"]) == (1.0, 2.0, "from-0")
    assert r["list_sums"] == [2.0, 2.0]
    assert r["slices"] == [[0, 1, 2, 3], [4, 5]]


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["first", "last"])
def test_sync_batchnorm_over_two_ranks_equals_batchnorm_over_the_whole_batch(two_process_run, layout):
    out, r = two_process_run
    got = load_file(str(out / f"syncbn_{layout}.safetensors"))
    torch.manual_seed(2)
    x = (torch.randn(6, 4, 3, 5) * 3 + 1).requires_grad_(True)
    w = torch.randn(6, 4, 3, 5)
    bn = torch.nn.BatchNorm2d(4) if layout == "first" else BatchNormChannelsLast(4)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-1, 1)
    y = bn(x) if layout == "first" else bn(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    (y * w).sum().backward()
    torch.testing.assert_close(got["y"], y.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["dx"], x.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(r[f"syncbn_{layout}_dweight_sum"]), bn.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["running_mean"], bn.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["running_var"], bn.running_var, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def one_process_reference():
    worker = _worker_module()
    model = worker.tiny_model()
    losses, _ = worker.train_steps(model, 4, D.DistributedEnv())
    return losses, {k: v.detach() for k, v in model.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_reproduce_one_process_with_the_same_global_batch(two_process_run, one_process_reference,
                                                                          mode):
    out, r = two_process_run
    losses, state = one_process_reference
    got = load_file(str(out / f"{mode}.safetensors"))
    assert got.keys() == state.keys()
    assert r[f"{mode}_losses"] == pytest.approx(losses, rel=1e-5)
    err, key = worst_rel_err(got, state)
    assert err < 1e-4, f"relative difference {err:.2e} in {key}"


@pytest.mark.slow
def test_fsdp_shards_parameters_and_gathers_whole_states(two_process_run, one_process_reference):
    _, r = two_process_run
    _, state = one_process_reference
    n_params = sum(v.numel() for k, v in state.items() if "running" not in k and "num_batches" not in k)
    assert r["fsdp_sharded"] is True
    # each rank holds about half of every parameter (dim-0 shards, padded when odd)
    assert n_params / 2 <= r["fsdp_local_params"] < n_params / 2 + 500
    redundant = redundant_parameters(_worker_module().tiny_model())  # not optimized: see train/redundant.py
    assert r["fsdp_optim_exp_avg_numel"] == n_params - sum(state[k].numel() for k in redundant)
    assert r["resumed_equal"] is True
    assert r["resumed_optimizer_equal"] is True  # the optimizer states the engine checkpoints round-trip


def test_checkpointed_recomputation_does_not_update_batchnorm_statistics_twice():
    from coatnet.models import create_model

    states = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = D.convert_sync_batchnorm(create_model("coatnet_pico", img_size=32, num_classes=3))
        model.set_grad_checkpointing(checkpointing)
        model(torch.randn(2, 3, 32, 32)).sum().backward()
        states.append(model.state_dict())
    assert states[1]["stages.0.blocks.0.norm1.num_batches_tracked"] == 1
    for k, v in states[0].items():
        torch.testing.assert_close(states[1][k], v, msg=k)


def test_an_empty_batch_gives_every_parameter_a_zero_gradient():
    # A rank left without samples in an epoch's last step must still reduce a gradient for every parameter.
    from coatnet.models import create_model

    model = create_model("coatnet_pico", img_size=32, num_classes=3)
    model(torch.randn(0, 3, 32, 32)).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []
    assert all(p.grad.abs().sum() == 0 for p in model.parameters())


def test_drop_path_masks_follow_the_sample_not_its_position_in_the_batch():
    from coatnet.layers import DropPath
    from coatnet.train.epoch import drop_path_noise

    layer = DropPath(0.5, stream=3).train()
    x = torch.ones(8, 2, 3, 3)
    idx = torch.arange(100, 108)
    whole = layer(x, drop_path_noise(0, 7, idx, streams=4))
    tail = layer(x[4:], drop_path_noise(0, 7, idx[4:], streams=4))  # the last four samples on their own
    kept = whole.flatten(1).amax(1) > 0
    assert 0 < int(kept.sum()) < 8
    torch.testing.assert_close(tail, whole[4:])
    torch.testing.assert_close(whole[kept], torch.full_like(whole[kept], 2.0))  # survivors rescaled by 1/keep


def test_each_drop_path_layer_of_a_model_has_its_own_stream():
    from coatnet.layers import DropPath
    from coatnet.models import create_model

    streams = [m.stream for m in create_model("coatnet_pico", drop_path_rate=0.1).modules() if isinstance(m, DropPath)]
    assert streams == list(range(len(streams))) and len(streams) > 10
