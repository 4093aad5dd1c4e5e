"""Elastic and multi-node training on CPU with gloo: `coatnet train --out DIR --auto-resume` restarted by
`torchrun --max-restarts` after a worker is SIGKILLed mid-epoch, and a two-"node" job (two torchrun
launchers on one machine, c10d rendezvous on 127.0.0.1) trains the weights one process trains."""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import worst_rel_err  # the per-tensor measure the library tests use

SRC = str(Path(__file__).resolve().parents[1] / "src")
# 3 epochs of 4 steps (48 images, global batch 12), checkpointed after every step so that a restart
# continues mid-epoch; deterministic kernels, no augmentation or stochastic depth (docs/distributed.md).
# coatnet_nano: with the default coatnet_micro, Adam turns roundoff in near-zero gradients into full-size steps
# of opposite sign, so runs that differ only in summation order (or memory format) end ~2% apart in a few weights
# after 8 steps, above these tests' 1e-3 (measured: one process NCHW vs channels_last, 0.022 in a conv weight).
ARGS = ["train", "--model", "coatnet_nano", "--no-channels-last", "--train-subset", "48", "--val-subset", "40",
        "--batch-size", "12", "--epochs", "3",
        "--no-augment", "--drop-path", "0", "--deterministic", "--no-progress", "--lr", "3e-3",
        "--precise-bn", "48", "--threads", "1", "--precision", "fp32"]
# fp32 asked for: "auto" times bf16 against fp32 in each process, and on this CPU (bf16 at 0.4-1.0x fp32's speed,
# depending on the load) a restart could take the other precision.
EPOCHS = 3
FMNIST = Path("/usr/share/datasets/fashion-mnist")
needs_data = pytest.mark.skipif(not FMNIST.is_dir(), reason="no Fashion-MNIST")


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}


def _torchrun(*opts: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *opts, "-m", "coatnet"]


def _run(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux /proc)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _epochs_logged(run: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The reference: one process, never interrupted."""
    out = tmp_path_factory.mktemp("runs") / "one"
    _run([sys.executable, "-m", "coatnet", *ARGS, "--out", str(out)])
    assert _epochs_logged(out) == list(range(1, EPOCHS + 1))
    return out


# -- the command line ----------------------------------------------------------------------------------------
def test_auto_resume_needs_the_run_folder():
    proc = subprocess.run([sys.executable, "-m", "coatnet", "train", "--auto-resume"], env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == ["error: --auto-resume needs --out DIR (the run folder that a "
                                                "restart continues)"]


def test_auto_resume_refuses_another_setting_of_the_run_it_continues(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"lr": 0.001, "recipe": "default"}))
    cmd = [sys.executable, "-m", "coatnet", "train", "--out", str(tmp_path), "--auto-resume"]
    proc = subprocess.run([*cmd, "--lr", "0.002"], env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and proc.stderr.startswith("error: cannot change --lr when resuming")
    proc = subprocess.run([*cmd, "--recipe", "fashion-mnist-full"], env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "holds a run of recipe 'default', not 'fashion-mnist-full'" in proc.stderr


@pytest.mark.slow
@needs_data
def test_the_same_command_line_starts_a_run_then_continues_it(tmp_path, uninterrupted):
    cmd = [sys.executable, "-m", "coatnet", *ARGS, "--out", str(tmp_path / "run"), "--auto-resume"]
    first = _run([*cmd, "--stop-at-step", "6"])  # stops mid-epoch 2, checkpointed
    assert "resuming" not in first.stderr and _epochs_logged(tmp_path / "run") == [1]
    again = _run(cmd)
    assert "resuming" in again.stderr and _epochs_logged(tmp_path / "run") == [1, 2, 3]
    err, key = worst_rel_err(load_file(str(tmp_path / "run" / "checkpoint-last.safetensors")),
                             load_file(str(uninterrupted / "checkpoint-last.safetensors")))
    assert err < 1e-5, f"relative difference {err:.2e} in {key}"  # one process both times: the same sums


# -- torchrun restarts a killed worker -----------------------------------------------------------------------
@pytest.mark.slow
@needs_data
def test_torchrun_restarts_a_killed_worker_and_the_run_ends_as_if_uninterrupted(tmp_path, uninterrupted):
    run = tmp_path / "elastic"
    cmd = [*_torchrun("--standalone", "--nproc-per-node", "2", "--max-restarts", "3", "--monitor-interval", "0.5"),
           *ARGS, "--out", str(run), "--auto-resume", "--save-every", "1"]
    launcher = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        state = run / "checkpoint-last.state.safetensors"
        deadline = time.time() + 300
        while not state.exists() and launcher.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert state.exists(), "no checkpoint appeared"
        time.sleep(random.uniform(0.0, 1.5))  # a random later step (or the evaluation between epochs)
        workers = _children(launcher.pid)
        assert len(workers) == 2, f"expected 2 workers of torchrun, found {workers}"
        victim = random.choice(workers)
        os.kill(victim, signal.SIGKILL)
        stdout, stderr = launcher.communicate(timeout=600)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, f"{stdout[-3000:]}\n{stderr[-5000:]}"
    assert "Signals.SIGKILL" in stderr or "exitcode: -9" in stderr or "restart" in stderr.lower()
    assert _epochs_logged(run) == list(range(1, EPOCHS + 1))  # every epoch once
    err, key = worst_rel_err(load_file(str(run / "checkpoint-last.safetensors")),
                             load_file(str(uninterrupted / "checkpoint-last.safetensors")))
    assert err < 1e-3, f"relative difference {err:.2e} in {key}"
    assert any(not torch.equal(a, b) for a, b in zip(load_file(str(run / "checkpoint-last.safetensors")).values(),
                                                     load_file(str(uninterrupted / "checkpoint-last.safetensors"))
                                                     .values()))  # really two processes' sums


# -- two "nodes" on one machine ------------------------------------------------------------------------------
@pytest.mark.slow
@needs_data
def test_two_launchers_as_two_nodes_train_the_weights_of_one_process(tmp_path, uninterrupted):
    port = _free_port()
    run = tmp_path / "two_nodes"
    common = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-id", "coatnet-test",
              "--rdzv-endpoint", f"127.0.0.1:{port}", "--local-addr", "127.0.0.1"]
    nodes = [subprocess.Popen([*_torchrun(*common, "--rdzv-conf", f"is_host={int(host)}"), *ARGS, "--out", str(run)],
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for host in (True, False)]
    try:
        outputs = [node.communicate(timeout=600) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    for node, (stdout, stderr) in zip(nodes, outputs):
        assert node.returncode == 0, f"{stdout[-3000:]}\n{stderr[-5000:]}"
    assert json.loads((run / "config.json").read_text())["world_size"] == 2
    assert sum(line.startswith("{") for out, _ in outputs for line in out.splitlines()) == 1  # rank 0 reports
    assert _epochs_logged(run) == list(range(1, EPOCHS + 1))
    err, key = worst_rel_err(load_file(str(run / "checkpoint-last.safetensors")),
                             load_file(str(uninterrupted / "checkpoint-last.safetensors")))
    assert err < 1e-3, f"relative difference {err:.2e} in {key}"


def test_auto_resume_accepts_the_same_list_valued_flags_and_refuses_others(tmp_path):
    # config.json stores --model-arg and --crop-scale as lists; the command line repeats them: not a change.
    from coatnet.cli import CliError, build_parser
    from coatnet.cli.train import build_config
    from coatnet.train import TrainConfig, get_recipe

    saved = TrainConfig().replace(**get_recipe("fashion-mnist-full")).replace(
        model_args=("stem_stride=1", "strides=2,2,2,1"), crop_scale=(0.5, 1.0))
    (tmp_path / "config.json").write_text(json.dumps(saved.to_dict()))
    line = ["train", "--recipe", "fashion-mnist-full", "--out", str(tmp_path), "--auto-resume", "--crop-scale", "0.5",
            "1", "--model-arg", "stem_stride=1", "strides=2,2,2,1"]
    cfg = build_config(build_parser().parse_args(line))
    assert cfg.resume and cfg.model_args == ("stem_stride=1", "strides=2,2,2,1") and cfg.crop_scale == (0.5, 1.0)
    with pytest.raises(CliError, match="cannot change --model-arg when resuming"):
        build_config(build_parser().parse_args([*line[:-1], "strides=2,2,2,2"]))
