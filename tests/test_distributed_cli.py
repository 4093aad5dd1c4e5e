"""`torchrun --nproc-per-node 2 -m coatnet train` on CPU: same weights as one process with the same global
batch, one printing and writing process, and a run resumed with another number of processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from coatnet.train.metrics import read_metrics
from test_distributed import worst_rel_err  # the per-tensor measure the library tests use

SRC = str(Path(__file__).resolve().parents[1] / "src")
# A short run: 4 steps per epoch of 12 images (6 per process), without augmentation or stochastic depth, on
# the default model (BatchNorm, synchronized, in every block): the check.
# coatnet_nano: with the default coatnet_micro, Adam turns roundoff in near-zero gradients into full-size steps
# of opposite sign, so runs that differ only in summation order (or memory format) end ~2% apart in a few weights
# after 8 steps, above these tests' 1e-3 (measured: one process NCHW vs channels_last, 0.022 in a conv weight).
# fp32 on every kind of CPU: these tests compare weights of computations that differ only in summation order, to
# 1e-3; under bf16 autocast (what `auto` picks on a CPU with fast bf16) the same runs end 0.1-0.8 apart in a few
# BatchNorm biases (measured on an AVX512-BF16 EPYC), so processes are compared in bf16 by their scores instead
# (test_bf16_processes_agree_in_their_scores).
ARGS = ["train", "--model", "coatnet_nano", "--train-subset", "48", "--val-subset", "40", "--batch-size", "12",
        "--epochs", "2", "--no-augment", "--drop-path", "0", "--deterministic", "--no-progress", "--lr", "3e-3",
        "--precision", "fp32"]
# With stochastic depth, on the LayerNorm preset: the masks are keyed by sample and step, so they do not
# depend on the number of processes either. (With BatchNorm, the biases whose only effect is a per-sample
# constant that the next BatchNorm nearly removes get weak gradients, and those drift ~1e-2 apart with
# roundoff: docs/distributed.md.)
DROP_PATH_ARGS = [*ARGS, "--model", "coatnet_nano_ln", "--drop-path", "0.2"]  # the last value wins

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="no Fashion-MNIST")]


def coatnet(*args: str, nproc: int = 0) -> subprocess.CompletedProcess:
    """`python -m coatnet ARGS`, under torchrun with `nproc` CPU processes when nproc > 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m"]
                if nproc else [sys.executable, "-m"])
    proc = subprocess.run([*launcher, "coatnet", *args], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    out = {"one": coatnet(*ARGS, "--out", str(root / "one"), "--threads", "1"),
           "two": coatnet(*ARGS, "--out", str(root / "two"), nproc=2),
           "one_dp": coatnet(*DROP_PATH_ARGS, "--out", str(root / "one_dp"), "--threads", "1"),
           "two_dp": coatnet(*DROP_PATH_ARGS, "--out", str(root / "two_dp"), nproc=2)}
    # Two processes stop mid-epoch; one process finishes the run.
    coatnet(*ARGS, "--out", str(root / "resumed"), "--stop-at-step", "3", nproc=2)
    out["resumed"] = coatnet("train", "--resume", str(root / "resumed"), "--stop-at-step", "1000", "--no-progress")
    # Sharded (FSDP) in two processes until mid-epoch, then replicated in one.
    coatnet(*ARGS, "--out", str(root / "fsdp"), "--stop-at-step", "3", "--fsdp", nproc=2)
    out["fsdp"] = coatnet("train", "--resume", str(root / "fsdp"), "--stop-at-step", "1000", "--no-fsdp",
                          "--no-progress")
    return root, out


@pytest.mark.parametrize("suffix", ["", "_dp"])
def test_two_processes_train_the_weights_one_process_trains(runs, suffix):
    root, _ = runs
    one = load_file(str(root / f"one{suffix}" / "checkpoint-last.safetensors"))
    two = load_file(str(root / f"two{suffix}" / "checkpoint-last.safetensors"))
    assert one.keys() == two.keys()
    err, key = worst_rel_err(two, one)
    assert err < 1e-3, f"relative difference {err:.2e} in {key}"
    assert any(not torch.equal(one[k], two[k]) for k in one)  # really two different computations


def test_metrics_are_reduced_over_processes(runs):
    root, _ = runs
    one, two = read_metrics(root / "one" / "metrics.jsonl"), read_metrics(root / "two" / "metrics.jsonl")
    assert len(one) == len(two) == 2  # read_metrics gives [] for a missing file: zip would compare nothing
    for a, b in zip(one, two):
        for k in ("train_loss", "train_top1", "val_loss", "val_top1"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k
    assert json.loads((root / "two" / "config.json").read_text())["world_size"] == 2


def test_only_rank_0_prints(runs):
    _, out = runs
    summary = [line for line in out["two"].stdout.splitlines() if line.startswith("epoch ")]
    assert len(summary) == 2  # one line per epoch, not one per process
    assert sum(line.startswith("{") for line in out["two"].stdout.splitlines()) == 1


def test_a_run_resumes_with_another_number_of_processes(runs):
    root, out = runs
    assert "resuming" in out["resumed"].stderr
    one = load_file(str(root / "one" / "checkpoint-last.safetensors"))
    resumed = load_file(str(root / "resumed" / "checkpoint-last.safetensors"))
    err, key = worst_rel_err(resumed, one)
    assert err < 1e-3, f"relative difference {err:.2e} in {key}"
    # the interrupted epoch's training metrics count every process's images once
    a, b = read_metrics(root / "one" / "metrics.jsonl"), read_metrics(root / "resumed" / "metrics.jsonl")
    assert b[0]["train_loss"] == pytest.approx(a[0]["train_loss"], rel=1e-4)


def test_fsdp_trains_the_same_weights_and_its_checkpoint_resumes_unsharded(runs):
    root, out = runs
    one = load_file(str(root / "one" / "checkpoint-last.safetensors"))
    fsdp = load_file(str(root / "fsdp" / "checkpoint-last.safetensors"))
    err, key = worst_rel_err(fsdp, one)
    assert err < 1e-3, f"relative difference {err:.2e} in {key}"
    assert json.loads((root / "fsdp" / "config.json").read_text())["fsdp"] is False  # as resumed


def test_bf16_processes_agree_in_their_scores(tmp_path):
    """The same runs in bf16 (what `auto` takes on a CPU with fast bf16, forced here on every CPU; emulated where
    the CPU lacks bf16 instructions): one process against two. bf16 rounds every product to 8 significant bits,
    so a change of summation order alone moves the trajectory: weights are not comparable (0.8 relative in a
    BatchNorm bias, measured on an AVX512-BF16 EPYC) and the losses drift by an amount that depends on the CPU
    (one process against two: 0.6% on that EPYC, 2.4% in the second epoch's val loss with emulated bf16 on an
    AVX512 Xeon, where one process with 2 threads against 1 thread moved it 1.5%; fp32 runs agree to 1e-5).
    So the yardstick is measured here: the same one-process run with 2 threads instead of 1, where only the
    summation order changes. The two-process run must lie within 3x that spread (at least 1% of the loss) of the
    one-process run. Top-1 on 40 images moves in steps of 2.5 points and is not compared."""
    bf16 = [*ARGS, "--precision", "bf16"]  # the last value wins
    coatnet(*bf16, "--out", str(tmp_path / "one"), "--threads", "1")
    coatnet(*bf16, "--out", str(tmp_path / "one_t2"), "--threads", "2")
    coatnet(*bf16, "--out", str(tmp_path / "two"), nproc=2)
    one, one_t2, two = (read_metrics(tmp_path / run / "metrics.jsonl") for run in ("one", "one_t2", "two"))
    assert len(one) == len(one_t2) == len(two) == 2
    for a, t, b in zip(one, one_t2, two):
        for k in ("train_loss", "val_loss"):
            spread = max(abs(t[k] - a[k]), 0.01 * a[k])
            assert abs(b[k] - a[k]) <= 3 * spread, (k, a[k], t[k], b[k])
    for run in ("one", "one_t2", "two"):
        assert json.loads((tmp_path / run / "config.json").read_text())["precision"] == "bf16"
