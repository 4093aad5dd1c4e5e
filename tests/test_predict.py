"""`coatnet predict` on files and folders: recursive, batched (same numbers as one at a time), unreadable files
in folders skipped with their reason, results as CSV or JSON lines."""
import csv
import json
import shutil

import pytest
from PIL import Image

from coatnet.cli import main
from coatnet.data.images import list_image_files
from coatnet.train.predict import predict_files

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, colour_images):
    """A folder as users have them: images in nested folders, in several formats and modes, a broken PNG, an
    empty JPEG, and files that are no images at all."""
    root = tmp_path_factory.mktemp("mixed")
    (root / "a" / "deeper").mkdir(parents=True)
    (root / "b").mkdir()
    for i, cls in enumerate(("red", "green", "blue", "white")):
        shutil.copy(colour_images / cls / "00.png", root / "a" / f"{cls}.png")
        Image.open(colour_images / cls / "01.png").convert("RGB").save(root / "b" / f"{cls}.JPG", quality=95)
    Image.open(colour_images / "red" / "02.png").convert("L").save(root / "a" / "deeper" / "grey.bmp")
    Image.open(colour_images / "blue" / "02.png").convert("P").save(root / "a" / "deeper" / "palette.gif")
    (root / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (root / "b" / "empty.jpg").write_bytes(b"")
    (root / "notes.txt").write_text("not an image, and not named like one: not listed")
    return root


def test_folders_are_searched_recursively_for_image_files(mixed):
    files = list_image_files([mixed])
    names = [f[len(str(mixed)) + 1:] for f in files]
    assert names == ["a/blue.png", "a/deeper/grey.bmp", "a/deeper/palette.gif", "a/green.png", "a/red.png",
                     "a/white.png", "b/blue.JPG", "b/broken.png", "b/empty.jpg", "b/green.JPG", "b/red.JPG",
                     "b/white.JPG"]
    assert list_image_files([mixed / "a" / "red.png", mixed / "b"])[0] == str(mixed / "a" / "red.png")
    with pytest.raises(FileNotFoundError, match="image not found"):
        list_image_files([mixed / "nope"])


def test_batches_give_the_numbers_of_one_image_at_a_time(mixed, tiny_run):
    ckpt = str(tiny_run / "checkpoint-best.safetensors")
    one = predict_files(ckpt, [mixed], top_k=4, skip_unreadable=True, batch_size=1)
    batched = predict_files(ckpt, [mixed], top_k=4, skip_unreadable=True, batch_size=5, workers=2)
    assert [r["image"] for r in batched] == list_image_files([mixed])  # input order, failures in place
    for a, b in zip(one, batched):
        assert a.keys() == b.keys() and a["image"] == b["image"]
        if "top" in a:
            assert [t["class"] for t in a["top"]] == [t["class"] for t in b["top"]]
            assert [t["prob"] for t in a["top"]] == pytest.approx([t["prob"] for t in b["top"]], abs=2e-6)
    errors = {r["image"].rsplit("/", 1)[-1]: r["error"] for r in batched if "error" in r}
    assert errors == {"broken.png": errors["broken.png"], "empty.jpg": "empty file"} and errors["broken.png"]
    with pytest.raises(ValueError, match="broken.png"):
        predict_files(ckpt, [mixed], top_k=4)


def test_a_mixed_folder_writes_csv_and_skips_unreadable_files_with_reasons(mixed, tiny_run, tmp_path, capsys):
    out = tmp_path / "preds.csv"
    code = main(["predict", "--checkpoint", str(tiny_run / "checkpoint-best.safetensors"), str(mixed),
                 "--output", str(out), "--top-k", "2", "--batch-size", "4", "--workers", "0"])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    rows = list(csv.DictReader(out.open()))
    assert [r["path"] for r in rows] == list_image_files([mixed])
    assert list(rows[0]) == ["path", "label_1", "prob_1", "label_2", "prob_2", "error"]
    good = [r for r in rows if not r["error"]]
    assert len(good) == 10 and all(float(r["prob_1"]) >= float(r["prob_2"]) > 0 for r in good)
    assert {r["path"].rsplit("/", 1)[-1] for r in rows if r["error"]} == {"broken.png", "empty.jpg"}
    summary = json.loads(stdout)
    assert summary["predicted"] == 10 and summary["unreadable"] == 2 and summary["img_per_s"] > 0
    assert f"warning: skipping unreadable file {mixed / 'b' / 'empty.jpg'}: empty file" in stderr
    assert "skipped 2 unreadable files of 12" in stderr and "Traceback" not in stderr


def test_json_lines_output_and_stdout_agree(mixed, tiny_run, tmp_path, capsys):
    ckpt = str(tiny_run / "checkpoint-best.safetensors")
    assert main(["predict", "--checkpoint", ckpt, str(mixed / "a"), "--output", str(tmp_path / "p.jsonl")]) == 0
    capsys.readouterr()
    written = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert main(["predict", "--checkpoint", ckpt, str(mixed / "a"), "--json"]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert written == printed and len(written) == 6
    assert all({t["class"] for t in r["top"]} == {"blue", "green", "red", "white"} for r in written)


def test_an_unknown_output_format_is_refused_before_work(tiny_run, mixed, tmp_path, capsys):
    assert main(["predict", "--checkpoint", str(tiny_run / "checkpoint-best.safetensors"), str(mixed),
                 "--output", str(tmp_path / "p.xlsx")]) == 1
    assert capsys.readouterr().err.startswith("error: --output") and not (tmp_path / "p.xlsx").exists()


def test_an_interrupted_run_leaves_no_output_file(tmp_path):
    from coatnet.train.predict import PredictionWriter

    row = {"image": "a.png", "top": [{"class": "red", "index": 2, "prob": 0.75}, {"class": "blue", "index": 0,
                                                                                   "prob": 0.25}]}
    with pytest.raises(KeyboardInterrupt):
        with PredictionWriter(tmp_path / "p.csv", 2) as writer:
            writer.write(row)
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with PredictionWriter(tmp_path / "p.csv", 3) as writer:
        writer.write(row)
        writer.write({"image": "b.png", "error": "empty file"})
    assert (tmp_path / "p.csv").read_text().splitlines() == [
        "path,label_1,prob_1,label_2,prob_2,label_3,prob_3,error", "a.png,red,0.750000,blue,0.250000,,,",
        "b.png,,,,,,,empty file"]
