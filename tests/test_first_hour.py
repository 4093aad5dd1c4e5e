"""A new user's first hour (issue 18): each documented command does what its help and the README say, on
small data, with the mistakes a newcomer makes. One behaviour per test; each failed before the fix."""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

import coatnet
from coatnet.cli import build_parser, main
from coatnet.models.weights import save_weights
from coatnet.train.finetune import finetune_config

SRC = str(Path(coatnet.__file__).resolve().parent.parent)


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}


# -- bugs -------------------------------------------------------------------------------------------------
def test_finetune_without_data_continues_on_the_checkpoints_data_split_and_size(tiny_run, colour_images):
    cfg = finetune_config(str(tiny_run / "checkpoint-last.safetensors"))
    assert (cfg.data, cfg.val_fraction, cfg.img_size) == (str(colour_images), 0.25, 32)


@pytest.fixture
def grey_weights(tmp_path):
    """A 1-channel, 10-class coatnet_nano and its weights file (no metadata: the tensors tell the shape)."""
    model = coatnet.create_model("coatnet_nano", in_chans=1, num_classes=10).eval()
    save_weights(model, tmp_path / "grey.safetensors")
    return model, tmp_path / "grey.safetensors"


def test_create_model_takes_the_input_channels_from_the_weights(grey_weights):
    model, path = grey_weights
    loaded = coatnet.create_model("coatnet_nano", pretrained=str(path)).eval()
    x = torch.rand(2, 1, 32, 32)
    assert loaded.in_chans == 1 and loaded.num_classes == 10
    torch.testing.assert_close(loaded(x), model(x))


def test_weights_for_other_input_channels_adapt_the_stem_so_grey_images_score_the_same(grey_weights):
    model, path = grey_weights
    rgb = coatnet.create_model("coatnet_nano", pretrained=str(path), in_chans=3).eval()  # finetune on RGB data
    x = torch.rand(2, 1, 32, 32)
    assert rgb.in_chans == 3
    torch.testing.assert_close(rgb(x.repeat(1, 3, 1, 1)), model(x), rtol=1e-4, atol=1e-5)


def test_a_resume_error_names_only_flags_that_exist(tiny_run, capsys):
    assert main(["train", "--resume", str(tiny_run), "--model", "coatnet_pico"]) == 1
    err = capsys.readouterr().err
    flags = set(re.findall(r"--[a-z][\w-]*", err))
    parser = build_parser("train")
    train_parser = next(a for a in parser._actions if hasattr(a, "choices") and a.choices and "train" in a.choices)
    known = {o for a in train_parser.choices["train"]._actions for o in a.option_strings}
    assert "--model" in flags and "--epochs" in flags and flags <= known, flags - known


@pytest.fixture
def finished_run(tiny_run, tmp_path):
    """A copy of the finished 2-epoch run (lr at its floor, 1e-5, after the last step)."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    return run


def test_resume_refuses_to_shorten_a_run(finished_run, capsys):
    before = (finished_run / "metrics.jsonl").read_text()
    assert main(["train", "--resume", str(finished_run), "--epochs", "1", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "has trained 2 epochs already and cannot be shortened" in err
    assert (finished_run / "metrics.jsonl").read_text() == before


@pytest.mark.slow
def test_extending_a_finished_run_says_how_the_learning_rate_changes(finished_run, capsys):
    assert main(["train", "--resume", str(finished_run), "--epochs", "3", "--no-progress", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"schedule now spans 3 epochs \(\d+ steps\): the lr goes from 1\.00e-05 \(the last step "
                     r"trained\) to \d\.\d\de-0[34] at step 10", err), err
    assert len((finished_run / "metrics.jsonl").read_text().splitlines()) == 3


def test_val_fraction_0_is_refused_before_the_run_folder_is_written(colour_images, tmp_path, capsys):
    assert main(["train", "--data", str(colour_images), "--val-fraction", "0", "--out", str(tmp_path / "r")]) == 1
    assert "val_fraction=0.0 must be in (0, 1)" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def cli_run(colour_images, tmp_path_factory):
    """`coatnet train` as a user runs it, in a subprocess whose stdout and stderr are pipes (not a terminal),
    with a --train-subset larger than the data and one epoch: (stdout, stderr, run folder)."""
    out = tmp_path_factory.mktemp("cli-run") / "run"
    proc = subprocess.run([sys.executable, "-m", "coatnet", "train", "--data", str(colour_images), "--img-size", "32",
                           "--val-fraction", "0.25", "--train-subset", "5000", "--epochs", "1", "--batch-size", "16",
                           "--workers", "0", "--threads", "1", "--precise-bn", "0", "--out", str(out)],
                          capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, proc.stderr, out


@pytest.mark.slow
def test_a_train_subset_larger_than_the_data_says_so(cli_run):
    assert "--train-subset 5000 is more than the 72 training images" in cli_run[1]


@pytest.mark.slow
def test_no_progress_bar_is_written_into_a_pipe(cli_run):
    assert "it/s" not in cli_run[1] and "%|" not in cli_run[1]


@pytest.mark.slow
def test_one_epoch_is_singular(cli_run):
    assert "1 epoch," in cli_run[0] and "1 epochs" not in cli_run[0] + cli_run[1]


@pytest.mark.slow
def test_json_numbers_are_rounded_to_six_decimals_or_significant_digits(cli_run):
    from coatnet.utils import rounded

    assert rounded({"loss": 0.024441871792078018, "img_per_s": 188.82640957069316, "lr": 1.625e-06}) == {
        "loss": 0.0244419, "img_per_s": 188.82641, "lr": 1.625e-06}
    result = json.loads(cli_run[0].strip().splitlines()[-1])  # metrics.jsonl keeps full precision (TensorBoard's)
    floats = [v for v in result.values() if isinstance(v, float)]
    assert floats and all(rounded(v) == v for v in floats)


def test_a_closed_pipe_ends_quietly():
    proc = subprocess.Popen([sys.executable, "-m", "coatnet", "weights"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=_env())
    proc.stdout.close()  # `coatnet weights | head -0`: the reader is gone before the first line
    assert proc.wait(timeout=120) == 141
    assert proc.stderr.read() == b""


@pytest.fixture(scope="module")
def torchscript_file(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "model.pt"
    assert main(["export", "--checkpoint", str(tiny_run / "checkpoint-best.safetensors"), "--format",
                 "torchscript", "--output", str(out), "--no-check"]) == 0
    return out


@pytest.mark.parametrize("command", ["predict", "eval"])
def test_predict_and_eval_name_a_torchscript_export_as_such(torchscript_file, colour_images, command, capsys):
    argv = [command, "--checkpoint", str(torchscript_file)] + (
        [str(colour_images / "red" / "00.png")] if command == "predict" else [])
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "is a TorchScript export" in err and "pickle" not in err


def test_create_model_names_a_torchscript_export_as_such(torchscript_file):
    with pytest.raises(ValueError, match="is a TorchScript export"):
        coatnet.create_model("coatnet_nano", pretrained=str(torchscript_file))


def test_a_torchscript_export_carries_classes_normalisation_and_channels(torchscript_file):
    from coatnet.export import read_export_metadata

    meta = read_export_metadata(torchscript_file, "torchscript")
    assert json.loads(meta["classes"]) == ["blue", "green", "red", "white"]
    assert (json.loads(meta["mean"]), json.loads(meta["std"])) == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert (meta["in_chans"], json.loads(meta["img_size"])) == ("3", [32, 32])
    # and torch itself reads it back beside the program
    extra = {"coatnet.json": ""}
    torch.jit.load(str(torchscript_file), _extra_files=extra)
    assert json.loads(extra["coatnet.json"])["classes"] == meta["classes"]


@pytest.mark.slow
def test_an_onnx_export_carries_classes_in_its_metadata_props(tiny_run, tmp_path):
    onnx = pytest.importorskip("onnx")
    out = tmp_path / "model.onnx"
    assert main(["export", "--checkpoint", str(tiny_run / "checkpoint-best.safetensors"), "--format", "onnx",
                 "--output", str(out), "--no-check"]) == 0
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(props["classes"]) == ["blue", "green", "red", "white"] and props["in_chans"] == "3"
    assert json.loads(props["std"]) == [0.229, 0.224, 0.225]


# -- study --report-only ------------------------------------------------------------------------------------
def _quick_rows(nice: int = 0, load: float = 0.1) -> list[dict]:
    """Finished rows of `coatnet study norms --quick`, as the runner writes them (values made up)."""
    import dataclasses

    from coatnet.study import get_study, plan
    from coatnet.study.definitions import recipe_id

    study = get_study("norms", quick=True)
    return [{"study": "norms", "variant": p.variant.name, "layout": p.variant.layout, "train_size": p.train_size,
             "seed": p.seed, "params": 600_000, "train_loss": 0.5, "train_top1": 80.0, "test_loss": 0.6,
             "test_top1": 75.0 + i, "test_top5": 99.0, "gap_top1": 5.0 - i, "seconds": 10.0, "test_images": 1000,
             "loss_change_last20": -0.01, "device": "cpu", "device_name": "test CPU", "precision": "fp32",
             "parallel": 1,
             "run_key": p.key, "recipe": dataclasses.asdict(study.recipe), "recipe_id": recipe_id(study.recipe),
             "machine": "test machine", "nice": nice, "load_avg": load, "cpus": 2}
            for i, p in enumerate(plan(study))]


def test_report_only_reports_quick_rows_against_the_quick_plan(tmp_path, capsys):
    (tmp_path / "norms.json").write_text(json.dumps(_quick_rows()))
    assert main(["study", "norms", "--report-only", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "norms.md").read_text()
    assert "All 4 planned rows finished" in md
    assert f"coatnet study norms --quick --out {tmp_path}" in md
    assert "(4 rows of" in capsys.readouterr().out


def test_report_only_without_rows_is_an_error_that_writes_nothing(tmp_path, capsys):
    assert main(["study", "norms", "--report-only", "--out", str(tmp_path / "empty")]) == 1
    assert "no rows to report" in capsys.readouterr().err
    assert not (tmp_path / "empty").exists()


@pytest.mark.parametrize("nice, load, shared", [(0, 0.1, False), (19, 0.1, True), (0, 3.5, True)])
def test_the_report_says_shared_only_when_the_rows_recorded_it(tmp_path, nice, load, shared):
    (tmp_path / "norms.json").write_text(json.dumps(_quick_rows(nice, load)))
    assert main(["study", "norms", "--report-only", "--out", str(tmp_path)]) == 0
    assert ("shared with other jobs" in (tmp_path / "norms.md").read_text()) == shared


# -- output -----------------------------------------------------------------------------------------------
def test_predict_columns_are_aligned(tiny_run, colour_images, capsys):
    files = [str(colour_images / "red" / "00.png"), str(colour_images / "white" / "13.png")]
    assert main(["predict", "--checkpoint", str(tiny_run / "checkpoint-best.safetensors"), *files,
                 "--top-k", "2", "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    starts = [[m.start() for m in re.finditer(r"\d\.\d{4}", line)] for line in lines]
    assert len(lines) == 2 and starts[0] == starts[1]


def test_unknown_model_names_and_fields_get_a_suggestion():
    with pytest.raises(ValueError, match="did you mean 'coatnet_nano'"):
        coatnet.create_model("coatnet_nan")
    with pytest.raises(ValueError, match="did you mean 'drop_path_rate'"):
        coatnet.create_model("coatnet_nano", drop_path=0.1)


def test_curves_have_whole_epoch_ticks_a_title_and_say_what_they_measure(monkeypatch, tmp_path):
    from coatnet.train import metrics
    from coatnet.train.metrics import plot_curves

    figures, real = [], metrics.figure
    monkeypatch.setattr(metrics, "figure", lambda **kw: figures.append(real(**kw)) or figures[-1])
    records = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.1 / e, "train_top1": 50 + e, "val_top1": 49 + e}
               for e in (1, 2, 3)]
    plot_curves(records, tmp_path / "curves.png", title="run: coatnet_nano on fashion-mnist")
    fig = figures[0]
    assert fig._suptitle.get_text() == "run: coatnet_nano on fashion-mnist"
    ticks = [t for ax in fig.axes for t in ax.get_xticks() if 1 <= t <= 3]
    assert ticks and all(t == int(t) for t in ticks)
    assert any("running mean" in t.get_text() and "eval mode" in t.get_text() for t in fig.texts)


def test_bench_measures_a_model_at_its_own_size():
    from coatnet.bench import benchmark

    result = benchmark("coatnet_nano", batch=1, warmup=0, repeats=1, threads=1)
    assert result.settings["img_size"] == 32


# -- shards ------------------------------------------------------------------------------------------------
def test_shards_leave_out_a_corrupt_image_and_name_it(colour_images, tmp_path, caplog):
    pytest.importorskip("webdataset")
    from coatnet.data.shards import write_shards

    folder = tmp_path / "images"
    shutil.copytree(colour_images, folder)
    (folder / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    index = write_shards(folder, tmp_path / "shards", shard_size=50, val_fraction=0.25)
    assert [s["path"] for s in index["skipped"]] == [str(folder / "red" / "broken.jpg")]
    assert sum(index["counts"].values()) == 96
    assert f"skipping unreadable file {folder / 'red' / 'broken.jpg'}" in caplog.text


def test_an_unreadable_sample_in_a_shard_is_named_by_tar_key_source_and_reason(tmp_path):
    pytest.importorskip("webdataset")
    from coatnet.data import DataSpec
    from coatnet.data.shards import FORMAT, ShardSource

    with tarfile.open(tmp_path / "val-000000.tar", "w") as tar:
        for name, data in (("000000000.jpg", b"\xff\xd8 truncated"), ("000000000.cls", b"0"),
                           ("000000000.src", b"/photos/cat.jpg")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "shards.json").write_text(json.dumps({
        "format": FORMAT, "classes": ["cat"], "splits": {"val": [{"file": "val-000000.tar", "count": 1}]}}))
    spec = DataSpec("s", ("cat",), 3, 32, 1.0, (0.5,) * 3, (0.5,) * 3)
    batch = next(ShardSource(tmp_path, "val").batches([torch.tensor([0])], spec))
    (where, reason), = batch.failures.items()
    assert where == f"{tmp_path / 'val-000000.tar'}#000000000 (from /photos/cat.jpg)"
    assert reason and reason != "unreadable"
