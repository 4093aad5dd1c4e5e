"""What `coatnet.train.train` does besides training: a library call prints nothing (the run's report goes
through logging; the command line puts it on stdout), and leaves the caller's random state as it found it."""
import logging

import torch

from coatnet.cli import main
from coatnet.train import TrainConfig, train


def _cfg(data, **kw):
    return TrainConfig(data=str(data), model="coatnet_nano", img_size=32, epochs=1, batch_size=16,
                       val_fraction=0.25, workers=0, threads=1, deterministic=True, precision="fp32",
                       drop_path=0.1, progress=False).replace(**kw)


def test_a_library_call_prints_nothing_and_logs_its_report(colour_images, capsys, caplog, monkeypatch):
    for name in ("coatnet", "coatnet.train.report"):  # as in a program that never ran the command line
        monkeypatch.setattr(logging.getLogger(name), "handlers", [])
    with caplog.at_level(logging.INFO, logger="coatnet"):
        res = train(_cfg(colour_images))
    out, err = capsys.readouterr()
    assert out == "" and err == ""
    report = [r.getMessage() for r in caplog.records if r.name == "coatnet.train.report"]
    assert report[0].startswith("device cpu, precision fp32")
    assert report[-1].startswith("epoch 1/1 ") and f"val_top1 {res['val_top1']:.2f}" in report[-1]


def test_the_command_line_prints_the_report_on_stdout(colour_images, tmp_path, capsys):
    assert main(["train", "--data", str(colour_images), "--model", "coatnet_nano", "--img-size", "32",
                 "--epochs", "1", "--batch-size", "16", "--val-fraction", "0.25", "--workers", "0",
                 "--threads", "1", "--precision", "fp32", "--no-progress", "--out", str(tmp_path / "run")]) == 0
    out, err = capsys.readouterr()
    assert "device cpu, precision fp32" in out and "epoch 1/1 " in out and "epoch 1/1 " not in err


def test_the_callers_random_state_is_kept_and_does_not_change_the_run(colour_images):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = train(_cfg(colour_images, quiet=True))
    assert torch.equal(torch.get_rng_state(), before)  # a step's manual_seed used to leave it re-seeded
    torch.manual_seed(7)
    second = train(_cfg(colour_images, quiet=True))
    assert {k: first[k] for k in ("train_loss", "val_loss", "val_top1")} == \
        {k: second[k] for k in ("train_loss", "val_loss", "val_top1")}
