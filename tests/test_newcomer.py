"""A new user's own data (issue 25): fine-tuning that moves, folder sizes that fit the images, errors that name
the real cause, metadata that travels with exports, documentation that matches what was measured. One behaviour
per test; each failed before its fix."""
from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import coatnet
from coatnet.cli import main
from coatnet.data import DataSpec, build_data, eval_transform
from coatnet.data.transforms import normalize
from coatnet.export import export_metadata
from coatnet.models import get_config
from coatnet.train.config import TrainConfig
from coatnet.publish import save_pretrained
from coatnet.train.checkpoint import load_model, load_train_state, read_checkpoint, state_path
from coatnet.train.engine import check_model, idle_settings, train
from coatnet.train.epoch import StepSettings
from coatnet.train.finetune import finetune_config
from coatnet.train.optim import WeightEMA
from coatnet.train.predict import predict_files, preprocess
from coatnet.train.recipes import describe_recipe
from coatnet.utils import did_you_mean

ROOT = Path(__file__).resolve().parent.parent


# -- 9: descriptions that match the measurements ----------------------------------------------------------------
def test_the_recipes_docstrings_state_the_readmes_measured_results():
    readme = (ROOT / "README.md").read_text()
    assert "**92.09% top-1" in readme and "87.4% in 115 s" in readme
    assert "92.09%" in describe_recipe("default")  # said 92.2%
    assert "87.4%" in describe_recipe("small-data")  # said ">= 85%"


def test_the_results_page_states_the_epochs_of_the_table_below_it():
    text = (ROOT / "docs" / "results" / "fashion-mnist.md").read_text()
    section = text.split("## `coatnet train` (recipe `default`)")[1].split("\n## ")[0]
    stated = re.findall(r"\n(\d+) epochs, batch 256", section)
    rows = re.findall(r"\n\| (\d+) \| [\d.]+ \| \**[\d.]+\** \| [\d.]+ \|", section)
    assert stated == [str(TrainConfig().epochs)] and len(rows) == TrainConfig().epochs  # said 8 above 7 rows


# -- 6: the command line's small mistakes -----------------------------------------------------------------------
def test_an_abbreviated_flag_is_an_error_not_another_flag(capsys):
    assert main(["train", "--epoch", "1"]) == 2  # was silently --epochs 1 (argparse's prefix matching)
    err = capsys.readouterr().err
    assert "unrecognized arguments: --epoch" in err and "did you mean '--epochs'?" in err


def test_a_model_name_typed_with_the_letter_o_suggests_the_digit():
    with pytest.raises(ValueError, match=r"did you mean 'coatnet_0'\?"):  # suggested coatnet_7
        get_config("coatnet_O")
    assert did_you_mean("COATNET_NANO", ["coatnet_nano", "coatnet_pico"]) == "; did you mean 'coatnet_nano'?"


# -- 3: errors that name the real cause -------------------------------------------------------------------------
def test_a_mistyped_checkpoint_path_is_named_with_the_file_meant(tiny_run, capsys):
    typo = tiny_run / "checkpoint-bset.safetensors"
    assert main(["finetune", "--checkpoint", str(typo), "--data", "fashion-mnist"]) == 1
    err = capsys.readouterr().err  # said "no model name recorded in it; pass the model (--model NAME)"
    assert err.strip() == (f"error: --checkpoint {typo}: no such file or folder; did you mean "
                           f"'{tiny_run / 'checkpoint-best.safetensors'}'?")


def test_create_model_from_a_missing_folder_says_it_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"weights hub/nonexist: no such file or folder .*'hf-hub:hub/nonex"):
        coatnet.create_model(pretrained="hub/nonexist")  # said it needs a model name
    with pytest.raises(FileNotFoundError, match=r"no such file or folder; did you mean '.*model'\?"):
        (tmp_path / "model").mkdir()
        coatnet.create_model(pretrained=str(tmp_path / "modle"))


def test_an_image_given_as_data_is_named_as_a_file_not_a_missing_folder(colour_images, capsys):
    image = colour_images / "red" / "00.png"
    assert main(["train", "--data", str(image), "--out", str(colour_images.parent / "never")]) == 1
    err = capsys.readouterr().err  # said "data folder not found" for a file that exists
    assert f"--data {image} is a file, not a folder" in err and f"perhaps {colour_images})" in err
    assert not (colour_images.parent / "never").exists()


def test_finetune_fails_on_missing_data_before_printing_anything(tiny_run, tmp_path, capsys):
    assert main(["finetune", "--checkpoint", str(tiny_run / "checkpoint-best.safetensors"),
                 "--data", str(tmp_path / "nothing")]) == 1
    out, err = capsys.readouterr()  # printed "fine-tuning ..." on stdout first
    assert out == "" and f"--data {tmp_path / 'nothing'}: no such file or folder" in err


# -- 4: an empty class folder ----------------------------------------------------------------------------------
def test_an_empty_class_folder_is_an_error_that_names_it(colour_images, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(colour_images, root)
    (root / "zebra").mkdir()  # trained to exit 0 with a 5-way head, one output never seen
    with pytest.raises(ValueError, match=r"class folder zebra holds no training images"):
        build_data(str(root))


# -- 7: the sizes a model takes ---------------------------------------------------------------------------------
def test_training_takes_every_size_the_model_takes():
    check_model(TrainConfig(model="coatnet_micro", img_size=48))  # was "must be a positive multiple of 32"
    with pytest.raises(ValueError, match=r"img_size=48: coatnet_nano takes sides that are multiples of 32 \(its "
                                         r"total stride\); nearest: 32 or 64"):
        check_model(TrainConfig(model="coatnet_nano", img_size=48))


# -- 2: a folder's input size follows its images ----------------------------------------------------------------
@pytest.fixture(scope="module")
def grey28(tmp_path_factory):
    """An ImageFolder of 3 classes x 6 grey 28x28 PNGs, like a user's own Fashion-MNIST export."""
    root = tmp_path_factory.mktemp("grey28")
    rng = np.random.default_rng(0)
    for k in range(3):
        (root / f"c{k}").mkdir()
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8), "L").save(root / f"c{k}" / f"{i}.png")
    return root


def test_a_folders_input_size_is_its_images_side_rounded_to_one_the_model_takes(grey28):
    assert build_data(str(grey28), size_multiple=8)[2].img_size == 32  # was 224: 819M multiply-adds per image
    assert build_data(str(grey28), size_multiple=32)[2].img_size == 32
    assert build_data(str(grey28), img_size=64, size_multiple=8)[2].img_size == 64  # a given size wins


def test_training_says_where_the_size_came_from_and_what_upscaling_costs(grey28, caplog):
    settings = dict(data=str(grey28), val_fraction=0.34, epochs=1, batch_size=6, workers=0, threads=1, precise_bn=0,
                    progress=False, quiet=False, stop_at_step=1)
    with caplog.at_level(logging.INFO, logger="coatnet"):
        train(TrainConfig(**settings))
        train(TrainConfig(**settings, img_size=64))
    text = caplog.text
    assert "img_size 32: the training images' median side (28 px) rounded to a multiple of 8" in text
    assert "img_size 64 upscales the images 2.3x (median side 28 px)" in text


# -- 1: fine-tuning that moves within a short run ---------------------------------------------------------------
def test_finetunes_lr_is_constant_as_its_help_says_whatever_lr_is_given(tiny_run, colour_images):
    cfg = finetune_config(str(tiny_run / "checkpoint-best.safetensors"), data=str(colour_images), lr=1e-3)
    settings = StepSettings.from_config(cfg, steps_per_epoch=5)
    assert [settings.lr_at(s) for s in (0, 75, settings.total_steps - 1)] == [1e-3] * 3  # decayed to 5e-5


def test_the_ema_warms_up_so_a_short_runs_average_is_of_its_later_weights():
    model = torch.nn.Linear(2, 2, bias=False)
    ema = WeightEMA(model, 0.9999, warmup=True)
    assert [round(ema.decay_at(t), 4) for t in (0, 8, 80, 10 ** 6)] == [0.1, 0.5, 0.9, 0.9999]
    with torch.no_grad():
        for step in range(10):
            model.weight.fill_(float(step + 1))  # the weights walk from 1 to 10
            ema.update(model, step)
    assert 8.0 < ema.state["weight"][0, 0] < 10.0  # without warm-up: 1.0 (the first weights, 99.9%)


def test_a_short_finetune_saves_weights_that_moved(tiny_run, colour_images, tmp_path):
    start = tiny_run / "checkpoint-last.safetensors"
    cfg = finetune_config(str(start), data=str(colour_images), val_fraction=0.25, img_size=32, epochs=2, lr=1e-3,
                          batch_size=16, workers=0, threads=1, precise_bn=0, progress=False, quiet=True,
                          out=str(tmp_path / "ft"), precision="fp32")
    train(cfg)  # 10 steps
    before, saved = read_checkpoint(start)[0], read_checkpoint(tmp_path / "ft" / "checkpoint-last.safetensors")[0]
    raw = load_train_state(state_path(tmp_path / "ft"))["model"]
    moved = [(saved[k] - before[k]).norm() / (raw[k] - before[k]).norm() for k in before
             if before[k].is_floating_point() and "running" not in k and (raw[k] - before[k]).norm() > 0]
    assert min(moved) > 0.5  # the EMA's share of the raw weights' move; 0.9999 without warm-up: ~0.001


def test_settings_that_cannot_act_within_the_runs_steps_are_named():
    settings = StepSettings.from_config(TrainConfig(epochs=2, warmup_epochs=3.0), steps_per_epoch=3)
    found = idle_settings(TrainConfig(ema_decay=0.9999, warmup_epochs=3.0, save_every=50), settings)
    assert [m.split(" (")[0] for m in found] == ["ema_decay 0.9999", "warmup_epochs 3.0", "save_every 50"]
    assert "averages over about 10,000 steps and this run has 6: 100% of the weights evaluated" in found[0]
    short = StepSettings.from_config(TrainConfig(epochs=2), steps_per_epoch=3)
    assert idle_settings(TrainConfig(ema_decay=0.9999, ema_warmup=True), short) == []


# -- 5: resuming a run that was stopped, not extended ---------------------------------------------------------
def test_resuming_a_run_stopped_mid_epoch_does_not_say_its_schedule_changed(colour_images, tmp_path, caplog):
    cfg = TrainConfig(model="coatnet_nano", data=str(colour_images), val_fraction=0.25, img_size=32, epochs=2,
                      batch_size=16, workers=0, threads=1, precise_bn=0, progress=False, quiet=True,
                      out=str(tmp_path / "run"), stop_at_step=7)  # 5 steps per epoch: killed inside epoch 2
    train(cfg)
    with caplog.at_level(logging.INFO, logger="coatnet"):
        result = train(dataclasses.replace(cfg, resume=True, stop_at_step=None))
    assert result["steps"] == 10 and "resuming" in caplog.text
    assert "schedule now spans" not in caplog.text  # said so: the lr at step 7 is not epoch 1's last


def test_predict_names_a_missing_output_folder_before_reading_anything(tiny_run, colour_images, capsys, monkeypatch):
    import coatnet.train.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "load_model", lambda *a, **k: pytest.fail("loaded the model first"))
    assert main(["predict", "--checkpoint", str(tiny_run / "checkpoint-best.safetensors"), str(colour_images),
                 "--output", str(colour_images.parent / "nodir" / "p.csv")]) == 1
    err = capsys.readouterr().err  # said "nodir/.p.csv.tmp: No such file or directory"
    nodir = colour_images.parent / "nodir"
    assert err.strip() == f"error: --output {nodir / 'p.csv'}: there is no folder {nodir} (create it first)"


def test_ctrl_c_names_the_checkpoint_kept_and_the_command_that_continues(tiny_run, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(coatnet.train, "train", interrupted)
    assert main(["train", "--resume", str(run), "--epochs", "3"]) == 130
    assert capsys.readouterr().err.strip() == (  # said only "error: interrupted"
        f"error: interrupted; {run} keeps the checkpoint at the end of epoch 2; continue with "
        f"`coatnet train --resume {run}`")


def test_resuming_a_finished_run_prints_no_summary_again(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert f"{run} is complete (2 of 2 epochs): nothing to do" in err
    assert "val_top1" not in out and "hardware use" not in out  # printed the final JSON and a benchmark again


# -- 8: what predicting needs travels with the weights ----------------------------------------------------------
@pytest.fixture(scope="module")
def hub_folder(tiny_run, tmp_path_factory):
    return save_pretrained(tiny_run / "checkpoint-best.safetensors", tmp_path_factory.mktemp("hub") / "colours")


def _by_hand(image: Image.Image, pre: dict) -> torch.Tensor:
    """docs/interop.md's preprocessing rule written out with Pillow alone."""
    _, size, _ = pre["input_size"]
    image = image.convert(pre["image_mode"])
    side = min(image.size) * pre["crop_fraction"]
    x0, y0 = (image.size[0] - side) / 2, (image.size[1] - side) / 2
    image = image.resize((size, size), Image.BILINEAR, box=(x0, y0, x0 + side, y0 + side))
    x = torch.from_numpy(np.array(image, dtype=np.float32)).reshape(size, size, -1).permute(2, 0, 1) / 255
    return (x - torch.tensor(pre["mean"])[:, None, None]) / torch.tensor(pre["std"])[:, None, None]


def test_a_model_from_a_hub_folder_carries_its_class_names_and_exact_preprocessing(hub_folder, colour_images):
    model = coatnet.create_model(pretrained=str(hub_folder))  # had neither
    assert model.pretrained_cfg["label_names"] == ["blue", "green", "red", "white"]
    pre = model.pretrained_cfg["preprocessing"]
    assert pre["class_names"] == model.pretrained_cfg["label_names"] and pre["tta_flip"] is True
    image = Image.open(colour_images / "red" / "00.png").resize((45, 37))  # not square, not the model's size
    torch.testing.assert_close(eval_transform(pre)(image), _by_hand(image, pre), atol=0, rtol=0)


def test_exports_carry_the_same_preprocessing_as_the_hub_folder(hub_folder):
    model = coatnet.create_model(pretrained=str(hub_folder))
    meta = export_metadata(model, hub_folder)  # a Hub folder gave no classes at all
    config = json.loads((hub_folder / "config.json").read_text())
    assert json.loads(meta["preprocessing"]) == config["preprocessing"] == model.pretrained_cfg["preprocessing"]
    assert json.loads(meta["classes"]) == config["label_names"]


def test_the_preprocessing_metadata_is_documented_key_by_key():
    text = (ROOT / "docs" / "interop.md").read_text().split("## Preprocessing metadata")[1].split("\n## ")[0]
    keys = DataSpec("x", ("a",), 3, 32, 0.875, (0.5,) * 3, (0.5,) * 3).preprocessing()
    assert [k for k in keys if f"`{k}`" not in text] == [] and f"`{keys['rule']}`" in text


def test_predict_averages_with_the_mirror_image_when_eval_does(tiny_run, colour_images):
    checkpoint = tiny_run / "checkpoint-best.safetensors"
    files = [str(colour_images / "red" / "00.png"), str(colour_images / "blue" / "03.png")]
    model, spec, info = load_model(checkpoint)
    assert info["run"]["tta_flip"]  # the run trained with flips, so eval averages each image with its mirror
    x = torch.stack([normalize(preprocess(f, spec)[None], spec.mean, spec.std)[0] for f in files])
    with torch.no_grad():
        expected = (model(x).softmax(-1) + model(x.flip(-1)).softmax(-1)) / 2
    got = predict_files(str(checkpoint), files, top_k=1)  # took one view
    assert [r["top"][0]["prob"] for r in got] == pytest.approx(expected.max(-1).values.tolist(), abs=1e-5)
    plain = predict_files(str(checkpoint), files, top_k=1, tta_flip=False)
    assert [r["top"][0]["prob"] for r in plain] != pytest.approx(expected.max(-1).values.tolist(), abs=1e-5)
