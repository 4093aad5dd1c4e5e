"""Bad input never gives a traceback: `coatnet predict / eval / train / finetune / export` on missing files,
folders, non-images, empty files, booby-trapped pickles, checkpoints of another architecture and bad flag
values each print exactly one line "error: ..." on stderr and exit non-zero; an ImageFolder with broken
files (truncated, empty, not an image, a decompression bomb) trains to the end with the files counted and
named, and --strict makes the first one an error."""
import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import coatnet
from coatnet.cli import main
from coatnet.data import DataSpec
from coatnet.data.datasets import IMAGENET_MEAN, IMAGENET_STD
from coatnet.train.checkpoint import save_weights_checkpoint

CLASSES = ("blue", "green", "red", "white")


def _checkpoint(path, model="coatnet_nano", classes=CLASSES):
    """A coatnet checkpoint as training writes it (untrained weights: nothing here needs accuracy)."""
    net = coatnet.create_model(model, num_classes=len(classes), img_size=32)
    spec = DataSpec("colours", tuple(classes), 3, 32, 0.875, IMAGENET_MEAN, IMAGENET_STD)
    save_weights_checkpoint(path, net.state_dict(), {
        "model_config": net.config.to_dict(), "data": spec.to_dict(), "epoch": 1, "step": 3, "metrics": {},
        "run": {"data": "colours", "model": model, "seed": 0, "val_fraction": 0.25}})
    return str(path)


class _CreatesFile:
    """Unpickling this runs open(path, "w"): a file appearing means code from the pickle was executed."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    f = {"ckpt": _checkpoint(d / "nano.safetensors"), "dir": str(d / "a-folder"), "missing": str(d / "nope.png"),
         "text": str(d / "notes.png"), "empty": str(d / "empty.png"), "good": str(d / "good.png"),
         "marker": str(d / "PWNED")}
    os.mkdir(f["dir"])
    Path(f["text"]).write_text("this is not an image\n")
    Path(f["empty"]).write_bytes(b"")
    Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(f["good"])
    for ext in ("pth", "pt", "bin", "safetensors"):
        f[ext] = str(d / f"evil.{ext}")
        Path(f[ext]).write_bytes(pickle.dumps({"stem.0.weight": _CreatesFile(f["marker"])}))
    return f


def _one_error_line(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, (code, err)
    return lines[0]


@pytest.mark.parametrize("image, says", [
    ("missing", "image not found: {missing}"),
    ("dir", "{dir} is a folder with no image files in it"),
    ("text", "cannot read image {text}: not an image file Pillow can decode"),
    ("empty", "cannot read image {empty}: empty file"),
])
def test_predict_on_a_bad_image_is_one_error_line(files, capsys, image, says):
    line = _one_error_line(capsys, ["predict", "--checkpoint", files["ckpt"], files[image]])
    assert line.startswith("error: " + says.format(**files)), line


def test_predict_reports_the_unreadable_images_after_predicting_the_others(files, capsys):
    code = main(["predict", "--checkpoint", files["ckpt"], files["text"], files["good"], files["empty"], "--json"])
    out, err = capsys.readouterr()
    assert code == 1 and [json.loads(s)["image"] for s in out.splitlines()] == [files["good"]]
    assert err == (f"error: cannot read 2 of 3 images: {files['text']}: not an image file Pillow can decode "
                   f"(and 1 more)\n")


@pytest.mark.parametrize("command", ["predict", "eval"])
@pytest.mark.parametrize("checkpoint, says", [
    ("missing", "checkpoint not found: {missing}"),
    ("dir", "checkpoint {dir} is a folder, not a file"),
    ("text", "{text} is not a valid safetensors file"),
    ("empty", "{empty} is empty, not a checkpoint"),
    ("pth", "{pth} is a pickle (PyTorch .pth/.pt/.bin), not a safetensors checkpoint; refusing to unpickle it"),
    ("pt", "{pt} is a pickle"), ("bin", "{bin} is a pickle"), ("safetensors", "{safetensors} is a pickle"),
])
def test_a_bad_checkpoint_is_one_error_line_and_runs_nothing(files, capsys, command, checkpoint, says):
    argv = [command, "--checkpoint", files[checkpoint]] + ([files["good"]] if command == "predict" else [])
    line = _one_error_line(capsys, argv)
    assert line.startswith("error: " + says.format(**files)), line
    assert not os.path.exists(files["marker"])


def test_a_booby_trapped_pickle_in_a_real_process_prints_one_line_and_creates_nothing(files, tmp_path):
    for command in (["predict", "--checkpoint", files["pth"], files["good"]],
                    ["eval", "--checkpoint", files["bin"]],
                    ["finetune", "--checkpoint", files["pt"], "--model", "coatnet_nano", "--out", str(tmp_path / "f")],
                    ["export", "--checkpoint", files["pth"], "--model", "coatnet_nano", "--format", "onnx"]):
        env = dict(os.environ, PYTHONPATH=str(Path(coatnet.__file__).resolve().parents[1]))
        proc = subprocess.run([sys.executable, "-m", "coatnet", *command], env=env, capture_output=True, text=True,
                              timeout=300)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), (command, proc.stderr)
        assert "unpickle" in lines[0] and "evil." in lines[0]
        assert not os.path.exists(files["marker"])


@pytest.mark.parametrize("claimed", ["pico", "15 billion parameters"])
def test_a_checkpoint_whose_metadata_claims_another_network_is_one_error_line(files, tmp_path, capsys, claimed):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(files["ckpt"], "pt") as f:  # nano's weights under another model config
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    info = json.loads(meta["coatnet"])
    config = coatnet.create_model("coatnet_pico", num_classes=4, img_size=32).config
    if claimed != "pico":  # would need ~60 GB if it were built: it must be refused before that
        config = coatnet.get_config("coatnet_nano", num_classes=4, img_size=32, widths=(64, 4096, 8192, 16384, 32768))
    info["model_config"] = config.to_dict()
    save_file(tensors, str(tmp_path / "mixed.safetensors"), metadata={**meta, "coatnet": json.dumps(info)})
    line = _one_error_line(capsys, ["predict", "--checkpoint", str(tmp_path / "mixed.safetensors"), files["good"]])
    assert "weights do not match the model config in its metadata" in line


def test_finetuning_a_checkpoint_into_another_architecture_is_one_error_line(files, colour_images, tmp_path,
                                                                            capsys):
    line = _one_error_line(capsys, ["finetune", "--checkpoint", files["ckpt"], "--model", "coatnet_pico",
                                    "--data", str(colour_images), "--img-size", "32", "--epochs", "1",
                                    "--threads", "1", "--no-progress", "--out", str(tmp_path / "ft")])
    assert line.startswith(f"error: {files['ckpt']} does not fit this architecture"), line


def test_evaluating_on_data_of_other_classes_is_one_error_line(files, capsys):
    line = _one_error_line(capsys, ["eval", "--checkpoint", files["ckpt"], "--data", "fashion-mnist",
                                    "--data-dir", files["dir"]])
    assert "fashion-mnist" in line.lower() or "not found" in line


@pytest.mark.parametrize("argv, says", [
    (["train", "--lr", "-1"], "error: lr=-1.0 must be positive"),
    (["train", "--lr", "fast"], "error: argument --lr: invalid float value: 'fast' (see `coatnet train --help`)"),
    (["train", "--layout", "C-C-X-T"], "error: layout='C-C-X-T' must be four stages of 'C' (MBConv) or 'T'"),
    (["train", "--img-size", "100"], "error: img_size=100: coatnet_micro takes sides that are multiples of 8 (its "
                                     "total stride); nearest: 96 or 104"),
    (["train", "--epochs", "0"], "error: epochs=0 must be positive"),
    (["train", "--translate", "-1"], "error: translate=-1 must be in [0, img_size / 2) pixels"),
    (["train", "--translate", "16", "--img-size", "32"], "error: translate=16 must be in [0, img_size / 2) pixels "
                                                         "(img_size 32)"),
    (["train", "--translate", "16"], "error: translate=16 must be in [0, img_size / 2) pixels (img_size 32)"),
    (["train", "--model", "coatnet_99"], "error: unknown model 'coatnet_99'"),
    (["train", "--device", "warp-drive"], "error: device='warp-drive' is not a device name"),
    (["train", "--resume", "/nonexistent/run"], "error: --resume /nonexistent/run: no config.json there"),
    (["train", "--no-such-flag"], "error: unrecognized arguments: --no-such-flag"),
    (["eval", "--checkpoint", "x.safetensors", "--batch-size", "0"], "error: batch_size=0 must be at least 1"),
    (["predict", "--checkpoint", "x.safetensors", "a.png", "--top-k", "0"], "error: --top-k must be at least 1"),
    (["predict", "--checkpoint", "x.safetensors"], "error: the following arguments are required: IMAGE"),
    (["frobnicate"], "error: argument COMMAND: invalid choice: 'frobnicate'"),
])
def test_a_bad_flag_value_is_one_error_line_naming_it(tmp_path, capsys, argv, says):
    if argv[0] == "train":
        argv = argv + ["--out", str(tmp_path / "run")]
    line = _one_error_line(capsys, argv)
    assert line.startswith(says), line
    assert not (tmp_path / "run" / "checkpoint-last.safetensors").exists()


def test_an_out_that_is_a_file_or_under_a_file_is_refused_before_training(tmp_path, capsys):
    (tmp_path / "taken").write_text("a file")
    line = _one_error_line(capsys, ["train", "--out", str(tmp_path / "taken")])
    assert line == f"error: run folder {tmp_path / 'taken'} is an existing file, not a folder: pass another --out"
    line = _one_error_line(capsys, ["train", "--out", str(tmp_path / "taken" / "run")])
    assert line == f"error: cannot write to run folder {tmp_path / 'taken' / 'run'}: Not a directory"


# -- an ImageFolder with broken files ------------------------------------------------------------------
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _broken_files(root: Path) -> dict[str, bytes]:
    rng = np.random.default_rng(1)
    pixels = Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8))
    jpeg, png = io.BytesIO(), io.BytesIO()
    pixels.save(jpeg, "JPEG")
    pixels.save(png, "PNG")
    bomb = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0))
            + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _png_chunk(b"IEND", b""))
    return {"train/red/truncated.jpg": jpeg.getvalue()[: len(jpeg.getvalue()) // 2],
            "train/green/truncated.png": png.getvalue()[: len(png.getvalue()) // 2],
            "train/blue/empty.png": b"", "train/white/letter.jpg": b"Dear colleague,\n",
            "train/red/bomb.png": bomb, "val/white/truncated.png": png.getvalue()[:100]}


@pytest.fixture(scope="module")
def broken_folder(colour_images, tmp_path_factory):
    root = tmp_path_factory.mktemp("broken")
    for cls in CLASSES:
        files = sorted((colour_images / cls).iterdir())
        for split, part in (("train", files[:16]), ("val", files[16:])):
            (root / split / cls).mkdir(parents=True)
            for f in part:
                shutil.copy(f, root / split / cls / f.name)
    for name, data in _broken_files(root).items():
        (root / name).write_bytes(data)
    return root


@pytest.mark.parametrize("workers", ["0", "2"])
def test_training_on_a_folder_with_broken_files_skips_names_and_counts_them(broken_folder, tmp_path, capsys,
                                                                            workers):
    argv = ["train", "--data", str(broken_folder), "--img-size", "32", "--epochs", "2", "--batch-size", "16",
            "--workers", workers, "--threads", "1", "--no-progress", "--out", str(tmp_path / "run")]
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out.splitlines()[-1])["skipped_images"] == 6 and "Traceback" not in err
    names = sorted(_broken_files(broken_folder))
    for epoch in (1, 2):
        summary = [s for s in err.splitlines() if s.startswith(f"warning: epoch {epoch}: skipped 6 unreadable files: ")]
        assert len(summary) == 1 and all(str(broken_folder / n) in summary[0] for n in names), err
    assert "decompression-bomb guard" in err and "empty file" in err and "image file is truncated" in err
    assert sum(s.startswith("warning: skipping unreadable file ") for s in err.splitlines()) == 6  # once each
    assert [json.loads(s)["epoch"] for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [1, 2]

    line = _one_error_line(capsys, argv[:-1] + [str(tmp_path / "strict"), "--strict"])
    assert line.startswith("error: cannot read image ") and line.endswith(
        "(run without --strict to skip unreadable files)")
    assert any(str(broken_folder / n) in line for n in names)


def test_evaluating_a_folder_with_broken_files_warns_once_and_counts_the_rest(broken_folder, files, capsys):
    code = main(["eval", "--checkpoint", files["ckpt"], "--data", str(broken_folder), "--workers", "0"])
    out, err = capsys.readouterr()
    assert code == 0 and json.loads(out)["n"] == 32
    assert err == f"warning: val: skipped 1 unreadable file: {broken_folder}/val/white/truncated.png " \
                  f"(image file is truncated)\n"
    assert _one_error_line(capsys, ["eval", "--checkpoint", files["ckpt"], "--data", str(broken_folder), "--strict",
                                    "--workers", "0"]).startswith("error: cannot read image ")


def test_a_run_folder_with_a_damaged_config_is_one_error_line(tmp_path, capsys):
    for text, says in (("{oops", "config.json is not valid JSON"), ("[1, 2]", "config.json does not hold"),
                       ('{"lr": "fast"}', "lr='fast' must be of type float")):
        (tmp_path / "config.json").write_text(text)
        line = _one_error_line(capsys, ["train", "--resume", str(tmp_path)])
        assert says in line, line


def test_layout_replaces_the_models_and_travels_with_the_checkpoint(colour_images, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["train", "--data", str(colour_images), "--img-size", "32", "--epochs", "1", "--batch-size", "24",
                 "--val-fraction", "0.25", "--workers", "0", "--threads", "1", "--no-progress", "--quiet",
                 "--layout", "C-C-C-T", "--out", str(run)])
    assert code == 0, capsys.readouterr().err
    from coatnet.train.checkpoint import load_model
    from coatnet.train.finetune import finetune_config

    model, _, _ = load_model(run / "checkpoint-last.safetensors")
    assert model.config.layout == "C-C-C-T"
    assert finetune_config(str(run / "checkpoint-last.safetensors")).layout == "C-C-C-T"
