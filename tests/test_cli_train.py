"""`coatnet train / eval / predict` end to end on a PNG ImageFolder and on Fashion-MNIST."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from coatnet.cli import main

FMNIST = "/usr/share/datasets/fashion-mnist"
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (20, 40, 230), "white": (240, 240, 240)}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """64 PNG files, 4 colour classes, assorted sizes and modes (RGB, RGBA, palette, grayscale, 16-bit)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for cls, colour in COLOURS.items():
        (root / cls).mkdir()
        for i in range(16):
            h, w = int(rng.integers(20, 70)), int(rng.integers(20, 70))
            arr = np.clip(np.array(colour) + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
            img = Image.fromarray(arr)
            mode = ("RGB", "RGBA", "P", "RGB")[i % 4] if cls != "white" else ("L", "I;16")[i % 2]
            if mode == "I;16":
                img = Image.fromarray((np.asarray(img.convert("L")).astype(np.uint16) * 257))
            elif mode != "RGB":
                img = img.convert(mode)
            img.save(root / cls / f"{i:02d}.png")
    return root


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_train_eval_predict_resume_on_an_image_folder(folder, tmp_path, capsys):
    run = tmp_path / "run"
    code, out, err = _run(capsys, "train", "--data", str(folder), "--img-size", "32", "--epochs", "2",
                          "--batch-size", "16", "--val-fraction", "0.25", "--out", str(run), "--workers", "2",
                          "--no-progress", "--deterministic", "--lr", "2e-3")
    assert code == 0, err
    final = json.loads(out.strip().splitlines()[-1])
    assert 0 <= final["val_top1"] <= 100 and final["epochs"] == 2
    assert sum(line.startswith("epoch ") for line in out.splitlines()) == 2
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["classes"] == sorted(COLOURS) and cfg["train_images"] == 48 and cfg["val_images"] == 16
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2 and (run / "curves.png").is_file()

    ckpt = str(run / "checkpoint-last.safetensors")
    code, out, _ = _run(capsys, "eval", "--checkpoint", ckpt)
    ev = json.loads(out)
    assert set(ev) == {"top1", "top5", "loss", "n"} and ev["n"] == 16 and ev["top5"] == 100.0
    assert ev["top1"] == pytest.approx(final["val_top1"])
    code, out, _ = _run(capsys, "eval", "--checkpoint", ckpt, "--split", "both")
    both = json.loads(out)
    assert both["train_n"] == 48 and both["gap_top1"] == pytest.approx(both["train_top1"] - both["val_top1"])

    images = [str(folder / "red" / "00.png"), str(folder / "white" / "01.png")]
    code, out, _ = _run(capsys, "predict", "--checkpoint", ckpt, *images, "--top-k", "3")
    lines = out.strip().splitlines()
    assert code == 0 and len(lines) == 2 and lines[0].startswith(images[0]) and len(lines[0].split()) == 1 + 2 * 3
    code, out, _ = _run(capsys, "predict", "--checkpoint", ckpt, images[0], "--json")
    pred = json.loads(out)
    assert pred["image"] == images[0] and len(pred["top"]) == 4
    assert sum(t["prob"] for t in pred["top"]) == pytest.approx(1.0, abs=1e-4)
    assert {t["class"] for t in pred["top"]} == set(COLOURS)

    code, out, err = _run(capsys, "train", "--resume", str(run), "--epochs", "3", "--no-progress")
    assert code == 0, err
    assert [json.loads(s)["epoch"] for s in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    code, _, err = _run(capsys, "train", "--resume", str(run), "--lr", "1.0")
    assert code == 1 and "cannot change --lr" in err


def test_unreadable_images_are_skipped_and_named_or_fail_with_strict(folder, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(folder, data / "train")
    shutil.copytree(folder / "red", data / "val" / "red")
    (data / "train" / "red" / "zz-broken.png").write_bytes(b"\x89PNG garbage")
    args = ["train", "--data", str(data), "--img-size", "32", "--epochs", "1", "--batch-size", "32",
            "--val-subset", "4", "--workers", "0", "--no-progress"]
    code, out, err = _run(capsys, *args, "--out", str(tmp_path / "r"))
    assert code == 0 and "zz-broken.png" in err and json.loads(out.splitlines()[-1])["skipped_images"] == 1
    code, _, err = _run(capsys, *args, "--out", str(tmp_path / "r2"), "--strict")
    assert code == 1 and "zz-broken.png" in err


def test_missing_fashion_mnist_is_a_clear_error(tmp_path, capsys):
    code, _, err = _run(capsys, "train", "--data-dir", str(tmp_path), "--out", str(tmp_path / "r"))
    assert code == 1 and err.startswith("error:") and "apt-get install dataset-fashion-mnist" in err


@pytest.mark.skipif(not os.path.isdir(FMNIST), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_subset_from_the_cli(tmp_path, capsys):
    run = tmp_path / "fm"
    code, out, err = _run(capsys, "train", "--train-subset", "256", "--val-subset", "200", "--epochs", "1",
                          "--batch-size", "64", "--out", str(run), "--no-progress")
    assert code == 0, err
    assert json.loads(out.splitlines()[-1])["val_top1"] >= 0
    img = tmp_path / "item.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(img)
    code, out, _ = _run(capsys, "predict", "--checkpoint", str(run / "checkpoint-best.safetensors"), str(img),
                        "--json")
    assert code == 0 and len(json.loads(out)["top"]) == 5
    code, out, _ = _run(capsys, "eval", "--checkpoint", str(run / "checkpoint-best.safetensors"), "--subset", "300")
    assert json.loads(out)["n"] == 300


def test_list_recipes(capsys):
    code, out, _ = _run(capsys, "train", "--list-recipes")
    assert code == 0 and "fashion-mnist-full" in out and "default" in out
