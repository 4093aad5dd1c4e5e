"""The run folder under faults, in-process: an interruption between writing the checkpoint and the metrics,
a second process on the same folder, a finished run started again without --resume, a damaged resume
state, resuming a finished run."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import coatnet

from coatnet.cli import main
from coatnet.train import TrainConfig, train
from coatnet.train.checkpoint import load_model, state_path
from coatnet.train.runfolder import remove_stale_temp_files, run_folder_lock


def _cfg(data, run, **kw):
    return TrainConfig(data=str(data), img_size=32, epochs=3, batch_size=24, val_fraction=0.25, workers=0,
                       threads=1, deterministic=True, progress=False, quiet=True, out=str(run)).replace(**kw)


def _epochs(run):
    return [json.loads(s)["epoch"] for s in (run / "metrics.jsonl").read_text().splitlines()]


def _one_error_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_an_interruption_between_checkpoint_and_metrics_loses_and_repeats_no_epoch(colour_images, tmp_path,
                                                                                   monkeypatch):
    import coatnet.train.engine as engine

    real = engine.write_metrics

    def interrupted_at_epoch_2(path, records):
        if len(records) == 2:  # the epoch-2 checkpoint is on disk, its metrics line not yet
            raise KeyboardInterrupt
        real(path, records)

    run = tmp_path / "run"
    monkeypatch.setattr(engine, "write_metrics", interrupted_at_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(colour_images, run))
    assert _epochs(run) == [1] and load_model(run / "checkpoint-last.safetensors")[2]["epoch"] == 2
    monkeypatch.setattr(engine, "write_metrics", real)
    res = train(_cfg(colour_images, run, resume=True))
    assert res["epochs"] == 3 and _epochs(run) == [1, 2, 3]
    whole = train(_cfg(colour_images, tmp_path / "whole"))
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[1])["val_loss"] == \
        json.loads((tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()[1])["val_loss"]
    assert res["val_top1"] == whole["val_top1"]


def test_a_finished_run_is_never_overwritten_and_resuming_it_changes_nothing(colour_images, tmp_path, capsys):
    run = tmp_path / "run"
    train(_cfg(colour_images, run, epochs=1))
    files = {p.name: p.read_bytes() for p in run.iterdir() if p.name != ".lock"}
    argv = ["train", "--data", str(colour_images), "--img-size", "32", "--epochs", "1", "--val-fraction", "0.25",
            "--workers", "0", "--threads", "1", "--no-progress", "--out", str(run)]
    assert main(argv) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert line == (f"error: run folder {run} already holds a training run (checkpoint at the end of epoch 1): "
                    f"continue it with --resume {run}, or pass another --out")
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    capsys.readouterr()
    for name, data in files.items():
        if name != "config.json":  # rewritten (same settings)
            assert (run / name).read_bytes() == data, name


def test_a_second_training_process_on_the_same_folder_is_refused(colour_images, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    with run_folder_lock(run):  # held as a running training process holds it
        assert main(["train", "--data", str(colour_images), "--img-size", "32", "--out", str(run)]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: run folder {run} is in use by another training process (pid ")
    assert not (run / "config.json").exists()


def test_a_damaged_resume_state_is_refused_with_the_file_named(colour_images, tmp_path, capsys):
    run = tmp_path / "run"
    train(_cfg(colour_images, run, epochs=1))
    state = state_path(run)
    state.write_bytes(state.read_bytes()[:1000])  # truncated, as by a failing disk
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: cannot resume from {state}: ") and "move it away" in line


def test_only_the_temporaries_of_interrupted_writes_are_removed(tmp_path):
    names = [".checkpoint-last.state.safetensors.k2j4_x.tmp", ".tmpAb3dE9", ".metrics.jsonl.abc.tmp",
             ".curves.png.z.tmp", ".config.json.q.tmp"]
    keep = ["notes.tmp", ".tmpnotes", ".hidden.tmp", "config.json", ".tmpAb3dE9x"]
    for n in names + keep:
        (tmp_path / n).write_text("x")
    assert remove_stale_temp_files(tmp_path) == sorted(names)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)


def test_the_lock_dies_with_its_process_even_when_forked_children_live_on(tmp_path):
    """A killed trainer's DataLoader workers (forked children) may outlive it for seconds: they must not keep
    its run folder locked, or an immediate --resume is refused."""
    script = (f"import os, time\nfrom coatnet.train.runfolder import run_folder_lock\nfrom pathlib import Path\n"
              f"with run_folder_lock(Path({str(tmp_path)!r})):\n"
              f"    if os.fork() == 0:\n        time.sleep(60)\n        os._exit(0)\n"
              f"    print('locked', flush=True)\n    time.sleep(60)\n")
    env = dict(os.environ, PYTHONPATH=str(Path(coatnet.__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout.readline() == "locked\n"
        with pytest.raises(OSError, match="in use by another training process"):
            with run_folder_lock(tmp_path):
                pass
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        time.sleep(0.1)
        with run_folder_lock(tmp_path):  # the orphaned child still runs, the lock is free
            pass
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the forked child too (it is in the session we started)


def test_files_written_atomically_get_the_umask_mode_not_a_private_one(tmp_path):
    import torch

    from coatnet.train.checkpoint import save_weights_checkpoint

    old = os.umask(0o022)
    try:
        save_weights_checkpoint(tmp_path / "c.safetensors", {"w": torch.ones(2)}, {})  # safetensors replaces the file
    finally:
        os.umask(old)
    assert (tmp_path / "c.safetensors").stat().st_mode & 0o777 == 0o644


def test_settings_read_back_from_config_json_keep_their_none_values():
    """A run trained without gradient clipping (clip_grad None, --clip-grad 0) resumes without it: config.json's
    null is the setting, not "the default" (1.0)."""
    cfg = TrainConfig(clip_grad=None, crop_scale=(0.5, 1.0), img_size=64)
    again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.clip_grad is None and again.crop_scale == (0.5, 1.0)


@pytest.mark.parametrize("later", ["worse", "better"])
def test_an_unreadable_best_checkpoint_on_resume_is_replaced_only_by_a_better_epoch(colour_images, tmp_path,
                                                                                     monkeypatch, caplog, later):
    """On resume the best score came from checkpoint-best alone: when it could not be read, the next epoch,
    however bad, overwrote it. Now the resume state's best stands in for it (with a warning)."""
    import coatnet.train.engine as engine

    run = tmp_path / "run"
    train(_cfg(colour_images, run, epochs=1))
    best = run / "checkpoint-best.safetensors"
    damaged = b"not a safetensors file"
    best.write_bytes(damaged)  # a damaged file; the resume state still records epoch 1's score
    real = engine.epoch_record

    def scored(*args, **kwargs):
        rec = real(*args, **kwargs)
        return {**rec, "val_top1": -1.0 if later == "worse" else 101.0}

    monkeypatch.setattr(engine, "epoch_record", scored)
    res = train(_cfg(colour_images, run, epochs=2, resume=True))
    assert res["epochs"] == 2 and "cannot read" in caplog.text and str(best) in caplog.text
    if later == "worse":
        assert best.read_bytes() == damaged and res["best_val_top1"] > 0
    else:
        assert load_model(best)[2]["epoch"] == 2 and res["best_val_top1"] == 101.0
