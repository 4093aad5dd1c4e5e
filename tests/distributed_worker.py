"""Checks run inside `torchrun --nproc-per-node 2` by tests/test_distributed.py (not a test module itself).

Usage: python -m torch.distributed.run --standalone --nproc-per-node N tests/distributed_worker.py OUT_DIR
Rank 0 writes OUT_DIR/results.json and OUT_DIR/*.safetensors; the test compares them with one process.
The functions `tiny_model`, `global_batches` and `train_steps` are shared with the one-process reference.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from coatnet.models import CoAtNet, CoAtNetConfig, TransformerConfig  # noqa: E402
from coatnet.train import distributed as D  # noqa: E402
from coatnet.train.redundant import freeze_redundant_parameters  # noqa: E402

GLOBAL_BATCH = 6  # not a multiple of 4: exercises uneven slices when run with 4 processes


def tiny_model() -> CoAtNet:
    """A reduced-width CoAtNet (all block types, BatchNorm and LayerNorm) for 32x32 images, its redundant
    parameters frozen as the engine freezes them (train/redundant.py)."""
    torch.manual_seed(0)
    cfg = CoAtNetConfig(depths=(1, 1, 1, 2, 1), widths=(8, 8, 16, 32, 32), img_size=32, num_classes=5,
                        transformer=TransformerConfig(head_dim=8))
    model = CoAtNet(cfg)
    freeze_redundant_parameters(model)
    return model


def global_batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`steps` global batches of GLOBAL_BATCH images, the last of 2 (like an epoch's remainder): with 2 ranks
    it leaves rank 1 without samples for that step."""
    g = torch.Generator().manual_seed(1)
    sizes = [GLOBAL_BATCH] * (steps - 1) + [2]
    return [(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 5, (n,), generator=g)) for n in sizes]


def train_steps(model: torch.nn.Module, steps: int, env: D.DistributedEnv) -> list[float]:
    """AdamW steps on this rank's slice of each global batch; returns the global mean loss of each step."""
    from coatnet.train.optim import param_groups

    opt = torch.optim.AdamW(param_groups(D.unwrap(model), 0.05), lr=1e-2)
    losses = []
    for x, y in global_batches(steps):
        sl = D.rank_slice(len(x), env.rank, env.world_size)
        loss_sum = torch.nn.functional.cross_entropy(model(x[sl]), y[sl], reduction="sum")
        opt.zero_grad(set_to_none=True)
        (loss_sum * (env.world_size / len(x))).backward()  # = mean over the slice * loss_scale(...)
        opt.step()
        sums = D.all_reduce_sums({"loss": loss_sum.item(), "n": len(x[sl])})
        losses.append(sums["loss"] / sums["n"])
    return losses, opt


def _save(path: Path, state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


def main(out: Path) -> None:
    torch.set_num_threads(1)
    env = D.init_distributed()
    results: dict = {"world_size": env.world_size, "backend": env.backend}

    # Collectives and the batch slicer.
    sums = D.all_reduce_sums({"rank": env.rank, "one": 1.0})
    results["sum_of_ranks"], results["count"] = sums["rank"], sums["one"]
    results["list_sums"] = D.all_reduce_sums([1.0, env.rank + 0.5])
    results["broadcast"] = D.broadcast_object(f"from-{env.rank}")
    sl = D.rank_slice(GLOBAL_BATCH, env.rank, env.world_size)
    gathered = [None] * env.world_size
    torch.distributed.all_gather_object(gathered, list(range(GLOBAL_BATCH))[sl])
    results["slices"] = gathered

    # SyncBatchNorm on this rank's slice, both layouts; gradients of input and affine parameters.
    for layout in ("first", "last"):
        torch.manual_seed(2)
        x = torch.randn(GLOBAL_BATCH, 4, 3, 5) * 3 + 1
        w = torch.randn(GLOBAL_BATCH, 4, 3, 5)
        bn = torch.nn.BatchNorm2d(4) if layout == "first" else __import__(
            "coatnet.models.blocks", fromlist=["x"]).BatchNormChannelsLast(4)
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-1, 1)
        bn = D.convert_sync_batchnorm(torch.nn.Sequential(bn))[0]
        xs = x[sl].clone().requires_grad_(True)
        if layout == "last":
            xs_in = xs.permute(0, 2, 3, 1)
            ys = bn(xs_in).permute(0, 3, 1, 2)
        else:
            ys = bn(xs)
        (ys * w[sl]).sum().backward()
        grads = [None] * env.world_size
        torch.distributed.all_gather_object(grads, (ys.detach(), xs.grad))
        if env.is_main:
            _save(out / f"syncbn_{layout}.safetensors", {
                "y": torch.cat([g[0] for g in grads]), "dx": torch.cat([g[1] for g in grads]),
                "dweight": bn.weight.grad.clone(), "dbias": bn.bias.grad.clone(),
                "running_mean": bn.running_mean, "running_var": bn.running_var})
        # each rank's affine gradient is its own share; the sum over ranks is the global one
        dw = D.all_reduce_sums({f"dw{i}": v for i, v in enumerate(bn.weight.grad.tolist())})
        results[f"syncbn_{layout}_dweight_sum"] = [dw[f"dw{i}"] for i in range(4)]

    # DDP with synchronized BatchNorm.
    model = D.wrap_model(tiny_model())
    results["ddp_losses"], _ = train_steps(model, 4, env)
    state = D.full_model_state(model)
    if env.is_main:
        _save(out / "ddp.safetensors", state)

    # FSDP2 with activation checkpointing, then gather the full model and optimizer states.
    model = D.apply_fsdp(D.convert_sync_batchnorm(tiny_model()), grad_checkpointing=True)
    results["fsdp_sharded"] = D.is_sharded(model)
    local = sum(p.to_local().numel() for p in model.parameters())
    results["fsdp_local_params"] = D.all_reduce_sums({"n": local})["n"] / env.world_size
    results["fsdp_losses"], opt = train_steps(model, 4, env)
    # The states a checkpoint holds, gathered as the engine's Checkpointer gathers them.
    state = D.full_model_state(model)
    optim_state = D.full_optimizer_state_dict(opt)
    if env.is_main:
        _save(out / "fsdp.safetensors", state)
        results["fsdp_optim_keys"] = sorted(optim_state["state"])[:3]
        results["fsdp_optim_exp_avg_numel"] = sum(s["exp_avg"].numel() for s in optim_state["state"].values())
    # Resume into a fresh sharded model from the gathered states (what a checkpoint with any process count
    # holds): one more step must equal continuing the original.
    full = D.broadcast_object({k: v for k, v in state.items()} if env.is_main else None)
    full_opt = D.broadcast_object(optim_state if env.is_main else None)
    resumed = D.apply_fsdp(D.convert_sync_batchnorm(tiny_model()), grad_checkpointing=False)
    from coatnet.train.optim import param_groups

    opt2 = torch.optim.AdamW(param_groups(resumed, 0.05), lr=1e-2)
    D.load_full_state(resumed, full, opt2, full_opt)  # as the Checkpointer resumes
    results["resumed_equal"] = all(torch.equal(a, b) for a, b in
                                   zip(D.full_model_state(resumed).values(), state.values()))
    regathered = D.full_optimizer_state_dict(opt2)["state"]
    results["resumed_optimizer_equal"] = regathered.keys() == optim_state["state"].keys() and all(
        torch.equal(regathered[pid][k], v) for pid, st in optim_state["state"].items() for k, v in st.items())
    if env.is_main:
        (out / "results.json").write_text(json.dumps(results))
    D.destroy_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
