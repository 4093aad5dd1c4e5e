"""Crash safety of real `coatnet train` processes: SIGKILL at chosen and random moments (before the first
checkpoint, in the middle of a checkpoint write, at a seeded random time) and --resume until the run ends;
the result must equal an uninterrupted run. Write faults while saving (file size limit, full disk,
read-only folder) must be one clear error line that keeps the previous checkpoint."""
import json
import os
import random
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import coatnet
from coatnet.train.checkpoint import load_model, read_checkpoint, read_progress

SRC = str(Path(coatnet.__file__).resolve().parents[1])
COLOURS = ("blue", "green", "red", "white")
EPOCHS = 5
TIMEOUT = 180  # seconds any one process may take before the test gives up (a hang is a failure)


@pytest.fixture
def images(colour_images):
    return colour_images


# coatnet_nano: the small disk below is sized so that its checkpoints fill it at the second epoch
def _train_args(data, run, epochs=EPOCHS, save_every=3):
    return ["--model", "coatnet_nano", "--data", str(data), "--img-size", "32", "--epochs", str(epochs),
            "--batch-size", "8",
            "--val-fraction", "0.25", "--workers", "0", "--threads", "1", "--save-every", str(save_every),
            "--deterministic", "--no-progress", "--out", str(run)]


def _start(*argv, preexec_fn=None):
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-m", "coatnet", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=preexec_fn)


def _run(*argv, preexec_fn=None):
    proc = _start(*argv, preexec_fn=preexec_fn)
    out, err = proc.communicate(timeout=TIMEOUT)
    return proc.returncode, out, err


def _wait_for(proc, condition, what):
    """Poll every millisecond until condition() holds; fail if the process ends first or time runs out."""
    deadline = time.time() + TIMEOUT
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the training process ended (rc {proc.returncode}) before {what}: {proc.stderr.read()}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.001)


def _kill(proc):
    os.kill(proc.pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == -signal.SIGKILL
    return out, err


def _temporaries(run):
    try:
        return [n for n in os.listdir(run) if n.startswith(".tmp") or n.endswith(".tmp")]
    except FileNotFoundError:
        return []


def _checkpoint_intact(run):
    """The checkpoint on disk is complete and readable: returns the global step it holds (-1: none yet)."""
    state = run / "checkpoint-last.state.safetensors"
    if not state.is_file():
        return -1
    progress = read_progress(state)
    if progress["epoch"] > 0 or (run / "checkpoint-last.safetensors").is_file():
        load_model(run / "checkpoint-last.safetensors")  # raises if damaged
    return progress["global_step"]


@pytest.mark.slow
def test_sigkill_three_times_then_resume_equals_an_uninterrupted_run(images, tmp_path):
    rng = random.Random(7)
    run = tmp_path / "killed"
    steps_seen = []

    # Kill 1: as soon as the run folder has its config.json, before any checkpoint exists.
    proc = _start("train", *_train_args(images, run))
    _wait_for(proc, lambda: (run / "config.json").is_file(), "config.json was written")
    _kill(proc)
    assert not (run / "checkpoint-last.state.safetensors").exists()
    steps_seen.append(_checkpoint_intact(run))

    # Kill 2: in the middle of a checkpoint write. The process is stopped (SIGSTOP) the moment a temporary
    # file of a write appears; if the file is still there while it is stopped, the write is unfinished and
    # SIGKILL lands inside it (otherwise it continues and we wait for the next write).
    proc = _start("train", "--resume", str(run))
    _wait_for(proc, lambda: (run / "checkpoint-last.state.safetensors").is_file(), "the first checkpoint")
    deadline = time.time() + TIMEOUT
    while True:
        _wait_for(proc, lambda: any(n.startswith((".tmp", ".checkpoint-")) for n in _temporaries(run)),
                  "a checkpoint write")
        os.kill(proc.pid, signal.SIGSTOP)
        left = _temporaries(run)
        if left:
            break
        os.kill(proc.pid, signal.SIGCONT)
        assert time.time() < deadline
    _kill(proc)
    steps_seen.append(_checkpoint_intact(run))

    # Kill 3: at a seeded random moment after the resumed process has written a checkpoint of its own.
    before = (run / "checkpoint-last.state.safetensors").stat().st_mtime_ns
    proc = _start("train", "--resume", str(run))
    _wait_for(proc, lambda: (run / "checkpoint-last.state.safetensors").stat().st_mtime_ns != before,
              "a new checkpoint")
    time.sleep(rng.uniform(0.0, 0.6))
    assert proc.poll() is None, "the run ended before the third kill"
    _, err = _kill(proc)
    steps_seen.append(_checkpoint_intact(run))
    assert f"removed {len(left)} temporary file(s) left by an interrupted write" in err

    # Resume to the end.
    code, out, err = _run("train", "--resume", str(run))
    assert code == 0, err
    assert "Traceback" not in err
    final = json.loads(out.strip().splitlines()[-1])
    assert final["epochs"] == EPOCHS

    assert steps_seen[0] == -1 and steps_seen[0] <= steps_seen[1] <= steps_seen[2], steps_seen
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, EPOCHS + 1))
    best = max(r["val_top1"] for r in records)  # checkpoint-best holds the first epoch that reached it
    _, _, best_info = load_model(run / "checkpoint-best.safetensors")
    assert best_info["epoch"] == min(r["epoch"] for r in records if r["val_top1"] == best)
    model, spec, info = load_model(run / "checkpoint-last.safetensors")
    assert info["epoch"] == EPOCHS and spec.classes == COLOURS
    assert read_progress(run / "checkpoint-last.state.safetensors")["epoch"] == EPOCHS
    assert _temporaries(run) == [], "temporaries of the interrupted write were not cleaned up"
    assert not [n for n in os.listdir(run) if n.startswith(".") and n != ".lock"]

    # Deterministic mode: the killed-and-resumed run is the uninterrupted one, weights and metrics.
    code, _, err = _run("train", *_train_args(images, tmp_path / "whole"))
    assert code == 0, err
    a, _ = read_checkpoint(tmp_path / "whole" / "checkpoint-last.safetensors")
    b, _ = read_checkpoint(run / "checkpoint-last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    keys = ("epoch", "train_loss", "train_top1", "val_loss", "val_top1", "lr", "step")
    rows = [[json.loads(s)[k] for k in keys] for s in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert rows == [[json.loads(s)[k] for k in keys] for s in (run / "metrics.jsonl").read_text().splitlines()]


def _one_error_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def _limit_file_size(limit):
    # CPython ignores SIGXFSZ, so a write past RLIMIT_FSIZE fails with EFBIG ("File too large").
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def _only_errors(err):
    """stderr without the informational lines of a resumed run."""
    return "\n".join(s for s in err.splitlines() if not s.startswith(("warning:", "resuming ", "no checkpoint")))


def test_a_write_that_fails_while_saving_is_one_error_line_and_keeps_the_previous_checkpoint(images, tmp_path):
    run = tmp_path / "run"
    code, _, err = _run("train", *_train_args(images, run, epochs=1, save_every=0))
    assert code == 0, err
    before = {name: (run / name).read_bytes() for name in ("checkpoint-last.safetensors",
                                                              "checkpoint-last.state.safetensors", "metrics.jsonl")}
    # Extend to 2 epochs with files limited to 1 MB: config.json and metrics fit, no checkpoint does.
    code, out, err = _run("train", "--resume", str(run), "--epochs", "2", preexec_fn=_limit_file_size(2**20))
    assert code == 1
    line = _one_error_line(_only_errors(err))
    assert re.fullmatch(rf"error: could not write {re.escape(str(run))}/checkpoint-(last\.state|best)\.safetensors: "
                        r"File too large; the previous checkpoint \(end of epoch 1\) is kept", line), line
    assert "epoch 2/2" not in out  # the epoch is not reported as done
    for name, data in before.items():
        assert (run / name).read_bytes() == data, f"{name} changed"
    _, _, info = load_model(run / "checkpoint-last.safetensors")
    assert info["epoch"] == 1 and not _temporaries(run)
    # Without the limit the same command finishes the run.
    code, _, err = _run("train", "--resume", str(run), "--epochs", "2")
    assert code == 0, err
    assert [json.loads(s)["epoch"] for s in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MB tmpfs (room for one set of checkpoints of coatnet_nano, 19 MB, not for a second copy of its
    11.5 MB resume state while it is replaced); skipped where mounting is not permitted."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _remount(mnt, options):
    for _ in range(50):  # EBUSY while a file on it is open for writing: retry
        if subprocess.run(["mount", "-o", f"remount,{options}", str(mnt)], capture_output=True).returncode == 0:
            return
        time.sleep(0.05)
    pytest.fail(f"could not remount {mnt} {options}")


@pytest.mark.slow
def test_a_full_disk_while_saving_is_one_error_line_and_resume_continues_after_freeing_space(images, small_disk):
    run = small_disk / "run"
    code, out, err = _run("train", *_train_args(images, run, epochs=3, save_every=0))
    assert code == 1, err
    line = _one_error_line(_only_errors(err))
    assert re.fullmatch(rf"error: could not write {re.escape(str(run))}/\S+: No space left on device; "
                        r"the previous checkpoint \(end of epoch 1\) is kept", line), line
    _, _, info = load_model(run / "checkpoint-last.safetensors")
    assert info["epoch"] == 1 and read_progress(run / "checkpoint-last.state.safetensors")["epoch"] == 1
    assert not _temporaries(run)
    _remount(small_disk, "size=64m")  # space freed
    code, _, err = _run("train", "--resume", str(run))
    assert code == 0, err
    assert [json.loads(s)["epoch"] for s in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


@pytest.mark.slow
def test_a_folder_that_turns_read_only_while_training_is_one_error_line(images, small_disk):
    _remount(small_disk, "size=64m")
    run = small_disk / "run"
    proc = _start("train", *_train_args(images, run, epochs=3, save_every=0))
    _wait_for(proc, lambda: (run / "curves.png").is_file(), "the first epoch's files")
    _remount(small_disk, "ro")
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 1
    line = _one_error_line(_only_errors(err))
    m = re.fullmatch(rf"error: could not write {re.escape(str(run))}/\S+: Read-only file system; "
                     r"the previous checkpoint \(end of epoch (\d)\) is kept", line)
    assert m, line
    _, _, info = load_model(run / "checkpoint-last.safetensors")
    assert info["epoch"] == int(m.group(1)) and read_progress(run / "checkpoint-last.state.safetensors")["epoch"] \
        == info["epoch"]
    # A read-only location is refused before any training.
    code, out, err = _run("train", *_train_args(images, small_disk / "other"))
    assert code == 1 and "epoch 1/" not in out
    assert _one_error_line(err) == f"error: cannot write to run folder {small_disk / 'other'}: Read-only file system"
