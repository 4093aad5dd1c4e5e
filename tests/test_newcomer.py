"""A new user's own data (issue 25): fine-tuning that moves, folder sizes that fit the images, errors that name
the real cause, metadata that travels with exports, documentation that matches what was measured. One behaviour
per test; each failed before its fix."""
from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import coatnet
from coatnet.cli import main
from coatnet.data import build_data
from coatnet.models import get_config
from coatnet.train.config import TrainConfig
from coatnet.train.engine import check_model, train
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
    with pytest.raises(FileNotFoundError, match=r"weights hub/nonexist: no such file or folder .*'hf-hub:hub/nonexist'"):
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
