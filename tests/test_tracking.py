"""`coatnet train --log tensorboard|wandb`: the values in the event files (and in the offline W&B run) are
those of metrics.jsonl and of the schedule; a resumed run continues the same steps without duplicates."""
import json
import time
from pathlib import Path

import pytest

from coatnet.cli import main
from coatnet.train import TrainConfig, train
from coatnet.train.schedule import lr_at
from coatnet.train.tracking import epoch_scalars, parse_log

pytestmark = pytest.mark.usefixtures("one_thread")
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def _events(run: Path):
    acc = event_accumulator.EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0,
                                                                                      "tensors": 0})
    acc.Reload()
    return acc


def _scalars(acc, tag):
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def _metrics(run: Path):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_event_files_hold_the_metrics_of_every_epoch(tiny_run):
    acc, records = _events(tiny_run), _metrics(tiny_run)
    config = json.loads((tiny_run / "config.json").read_text())
    steps = config["steps_per_epoch"] * 2
    assert [r["step"] for r in records] == [steps // 2, steps]
    for tag, key in (("val/top1", "val_top1"), ("val/top5", "val_top5"), ("val/loss", "val_loss"),
                     ("epoch/train_loss", "train_loss"), ("epoch/train_top1", "train_top1"), ("epoch/lr", "lr")):
        assert _scalars(acc, tag) == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in records], tag


def test_every_step_logs_its_loss_learning_rate_and_speed(tiny_run):
    acc, records = _events(tiny_run), _metrics(tiny_run)
    config = json.loads((tiny_run / "config.json").read_text())
    total, warmup = config["total_steps"], config["warmup_steps"]
    lr = _scalars(acc, "train/lr")
    assert [s for s, _ in lr] == list(range(1, total + 1))
    assert [v for _, v in lr] == pytest.approx([lr_at(s - 1, config["lr"], total, warmup, config["min_lr"],
                                                      config["schedule"]) for s in range(1, total + 1)], rel=1e-6)
    loss = _scalars(acc, "train/loss")
    assert [s for s, _ in loss] == list(range(1, total + 1)) and all(0 < v < 10 for _, v in loss)
    assert all(v > 0 for _, v in _scalars(acc, "train/img_per_s"))
    # An epoch's running train loss is the image-weighted mean of its steps' losses (all steps hold 16 images
    # but the last of each epoch: 72 = 4 x 16 + 8).
    per_epoch = config["steps_per_epoch"]
    weights = [16] * (per_epoch - 1) + [72 - 16 * (per_epoch - 1)]
    for e, r in enumerate(records):
        values = [v for _, v in loss[e * per_epoch:(e + 1) * per_epoch]]
        assert sum(w * v for w, v in zip(weights, values)) / 72 == pytest.approx(r["train_loss"], rel=1e-5)


def test_each_epoch_shows_predicted_validation_images_with_their_labels(tiny_run):
    acc, records = _events(tiny_run), _metrics(tiny_run)
    assert [e.step for e in acc.Images("predictions")] == [r["step"] for r in records]
    image = acc.Images("predictions")[0]
    assert image.width > 8 * 50 and image.encoded_image_string[:4] == b"\x89PNG"
    texts = acc.Tensors("predictions/text_summary")
    assert [t.step for t in texts] == [r["step"] for r in records]
    table = texts[-1].tensor_proto.string_val[0].decode()
    rows = [line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 8 and all(row.split("|")[2].strip() in ("blue", "green", "red", "white") for row in rows)


def test_a_resumed_run_continues_the_steps_and_hides_what_a_killed_run_wrote_after_its_checkpoint(
        colour_images, tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path / "run"
    base = dict(data=str(colour_images), img_size=32, epochs=2, batch_size=16, val_fraction=0.25, out=str(run),
                workers=0, threads=1, progress=False, quiet=True, log="tensorboard", deterministic=True)
    train(TrainConfig(**base, stop_at_step=3))
    # What a process killed after step 3's checkpoint would leave: events of steps it went on to log.
    ghost = SummaryWriter(str(run / "tensorboard"))
    for step in (4, 5, 6):
        ghost.add_scalar("train/loss", 99.0, step)
    ghost.close()
    train(TrainConfig(**base, resume=True))
    acc = _events(run)
    loss = _scalars(acc, "train/loss")
    total = json.loads((run / "config.json").read_text())["total_steps"]
    assert [s for s, _ in loss] == list(range(1, total + 1))  # every step once, none of the ghosts
    assert all(v < 99 for _, v in loss)
    assert [s for s, _ in _scalars(acc, "val/top1")] == [r["step"] for r in _metrics(run)]
    # The same numbers as a run that was never interrupted.
    straight = tmp_path / "straight"
    train(TrainConfig(**{**base, "out": str(straight)}))
    assert [v for _, v in _scalars(_events(straight), "train/loss")] == pytest.approx([v for _, v in loss], rel=1e-5)


def _wandb_history(run: Path) -> list[dict]:
    """The history rows of the offline W&B run in a run folder, read from its .wandb file: a LevelDB-style log
    (7-byte header ':W&B' + magic + version; 32 KiB blocks of records: crc32, length, type, protobuf)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run.glob("wandb/offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending, rows = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk  # full, first | middle, last
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def test_wandb_offline_run_holds_the_same_values(colour_images, tmp_path, capsys):
    pytest.importorskip("wandb")
    run = tmp_path / "run"
    assert main(["train", "--data", str(colour_images), "--img-size", "32", "--epochs", "1", "--batch-size", "16",
                 "--val-fraction", "0.25", "--out", str(run), "--workers", "0", "--threads", "1", "--no-progress",
                 "--quiet", "--log", "wandb"]) == 0
    capsys.readouterr()
    (record,) = _metrics(run)
    for _ in range(50):  # wandb's service process may still be writing the file for a moment
        steps = {row["_step"]: row for row in _wandb_history(run)}
        if record["step"] in steps:
            break
        time.sleep(0.2)
    assert sorted(steps) == list(range(1, record["step"] + 1))
    last = steps[record["step"]]
    for key, value in epoch_scalars(record).items():
        assert last[key] == pytest.approx(value, rel=1e-6), key
    assert last["train/lr"] == pytest.approx(record["lr"], rel=1e-6)
    assert last["predictions/_type"] == "images/separated" and last["predictions/count"] == 8
    assert last["predictions/captions"][0].endswith("(label: blue)")
    assert len((run / "wandb-run-id").read_text().strip()) >= 8


def test_log_names_are_checked_before_anything_is_written(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown tracker 'mlflow'"):
        parse_log("tensorboard,mlflow")
    assert parse_log("tensorboard, wandb") == ("tensorboard", "wandb") and parse_log(None) == ()
    assert main(["train", "--log", "comet", "--out", str(tmp_path / "r")]) == 1
    assert "unknown tracker 'comet'" in capsys.readouterr().err and not (tmp_path / "r").exists()
    with pytest.raises(ValueError, match="writes into the run folder"):
        TrainConfig(log="tensorboard").validate()


def test_finetuning_logs_too(tiny_run, colour_images, tmp_path, capsys):
    run = tmp_path / "ft"
    assert main(["finetune", "--checkpoint", str(tiny_run / "checkpoint-best.safetensors"), "--data",
                 str(colour_images), "--img-size", "64", "--epochs", "1", "--batch-size", "24", "--out", str(run),
                 "--threads", "1", "--no-progress", "--quiet", "--log", "tensorboard"]) == 0
    capsys.readouterr()
    (record,) = _metrics(run)
    assert _scalars(_events(run), "val/top1") == [(record["step"], pytest.approx(record["val_top1"], rel=1e-6))]


def test_library_plots_leave_the_callers_matplotlib_backend_alone(tmp_path):
    """curves.png, the prediction figure, the study plot and explain's pictures draw on their own Agg canvases:
    a caller's interactive backend is not switched (matplotlib.use("Agg") inside a library function did)."""
    import subprocess
    import sys

    code = (
        "import matplotlib; matplotlib.use('template'); import torch\n"
        "from coatnet.train.metrics import plot_curves\n"
        "from coatnet.train.tracking import prediction_figure\n"
        f"plot_curves([{{'epoch': 1, 'train_loss': 1.0, 'val_loss': 1.1, 'train_top1': 50.0, 'val_top1': 40.0}}], "
        f"{str(tmp_path / 'c.png')!r})\n"
        "fig = prediction_figure(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), ['a', 'b'], ['a', 'a'])\n"
        "fig.canvas.draw()\n"
        "print(matplotlib.get_backend())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "template" and (tmp_path / "c.png").stat().st_size > 1000
