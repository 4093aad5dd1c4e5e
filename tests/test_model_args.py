"""`coatnet train --model-arg KEY=VALUE`: any field of the model's config changed from the command line, recorded
in the run (config.json, the checkpoint, the reproducing command) and carried into evaluation and fine-tuning;
`coatnet models --config NAME` prints those fields in the form the flag takes."""
from __future__ import annotations

import json

import shlex

import pytest
from safetensors import safe_open

from coatnet.cli import build_parser, main
from coatnet.cli.train import build_config
from coatnet.models import get_config
from coatnet.publish import train_command
from coatnet.train.config import TrainConfig, parse_model_args
from coatnet.train.finetune import finetune_config


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_values_are_python_literals_else_strings():
    got = parse_model_args(("stem_stride=1", "strides=2,2,2,1", "widths=[32, 48, 96, 192, 192]",
                            "transformer.norm=layernorm", "mbconv.expand_ratio=6", " head_dim = 16 "))
    assert got == {"stem_stride": 1, "strides": (2, 2, 2, 1), "widths": (32, 48, 96, 192, 192),
                   "transformer.norm": "layernorm", "mbconv.expand_ratio": 6, "head_dim": 16}
    assert TrainConfig(layout="C-T-T-T", model_args=("stem_stride=1",)).model_overrides() == {
        "stem_stride": 1, "layout": "C-T-T-T"}


@pytest.mark.parametrize("word, message", [
    ("stem_stride", "'stem_stride' is not KEY=VALUE"),
    ("=1", "'=1' is not KEY=VALUE"),
    ("stem stride=1", "'stem stride=1' is not KEY=VALUE"),
    ("num_classes=3", "num_classes is set by the data's class count"),
    ("img_size=64", "img_size is set by --img-size"),
    ("layout=C-T-T-T", "layout is set by --layout"),
    ("drop_path_rate=0.1", "drop_path_rate is set by --drop-path"),
])
def test_a_malformed_or_reserved_word_is_refused_by_validate(word, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(model_args=(word,)).validate()


def test_a_key_given_twice_is_refused():
    with pytest.raises(ValueError, match="stem_stride is given twice"):
        parse_model_args(("stem_stride=1", "stem_stride=2"))


@pytest.mark.parametrize("word, message", [
    ("stem_strid=1", "unknown config field 'stem_strid'; did you mean 'stem_stride'"),
    ("stem_stride=3", "stem_stride=3 must be 1 or 2"),
    ("strides=2", "strides=2 must be four values of 1 or 2"),
])
def test_the_cli_names_a_field_or_value_the_model_refuses_before_writing(tmp_path, capsys, word, message):
    run = tmp_path / "run"
    code, out, err = _run(capsys, "train", "--model", "coatnet_micro", "--model-arg", word, "--epochs", "1",
                          "--out", str(run))
    assert code == 1 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not run.exists()


def test_the_flag_repeats_and_the_runs_command_sets_it_back():
    args = build_parser("train").parse_args(["train", "--model-arg", "stem_stride=1", "strides=2,2,2,1",
                                             "--model-arg", "transformer.head_dim=16"])
    cfg = build_config(args)
    assert cfg.model_args == ("stem_stride=1", "strides=2,2,2,1", "transformer.head_dim=16")
    cfg = cfg.replace(model_args=("strides=(2, 2, 2, 1)", "head_dim=16"))  # spaces and brackets: quoted
    words = shlex.split(train_command(cfg.to_dict()))
    assert words[words.index("--model-arg") + 1:][:2] == ["strides=(2, 2, 2, 1)", "head_dim=16"]
    assert build_config(build_parser("train").parse_args(words[1:])).model_args == cfg.model_args


def test_models_config_lists_fields_the_flag_sets_back(capsys):
    code, out, _ = _run(capsys, "models", "--config", "coatnet_mini")
    assert code == 0
    words = out.splitlines()
    assert "stem_stride=2" in words and "strides=(1, 2, 2, 1)" in words and "transformer.norm=batchnorm" in words
    reserved = ("num_classes=", "in_chans=", "img_size=", "drop_path_rate=", "layout=")
    settable = tuple(w for w in words if not w.startswith(reserved))
    assert len(settable) == len(words) - len(reserved)
    # Every printed field, fed back through --model-arg's parser, rebuilds the same config; a changed one changes it.
    assert get_config("coatnet_mini", **parse_model_args(settable)) == get_config("coatnet_mini")
    changed = tuple(w if w != "stem_stride=2" else "stem_stride=1" for w in settable)
    assert get_config("coatnet_mini", **parse_model_args(changed)).stem_stride == 1
    code, out, _ = _run(capsys, "models", "--config", "coatnet_mini", "--json")
    assert json.loads(out) == get_config("coatnet_mini").to_dict() | {"depths": [2, 2, 2, 2, 1],
                                                                      "widths": [48, 48, 96, 192, 192],
                                                                      "strides": [1, 2, 2, 1]}


def test_a_run_with_model_args_builds_records_evaluates_and_fine_tunes_that_model(colour_images, tmp_path, capsys):
    run = tmp_path / "run"
    code, out, err = _run(capsys, "train", "--data", str(colour_images), "--model", "coatnet_micro",
                          "--model-arg", "mbconv.expand_ratio=2", "transformer.head_dim=16", "--img-size", "32",
                          "--epochs", "1", "--batch-size", "24", "--val-fraction", "0.25", "--out", str(run),
                          "--workers", "0", "--no-progress", "--precision", "fp32", "--threads", "1")
    assert code == 0, err
    final = json.loads(out.strip().splitlines()[-1])
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model_args"] == ["mbconv.expand_ratio=2", "transformer.head_dim=16"]
    ckpt = run / "checkpoint-last.safetensors"
    with safe_open(str(ckpt), "pt") as f:
        info = json.loads(f.metadata()["coatnet"])
        conv1 = f.get_tensor("stages.1.blocks.1.conv1.weight")  # S2's second block: 1x1 expansion
    assert info["model_config"]["mbconv"]["expand_ratio"] == 2 and info["model_config"]["transformer"]["head_dim"] == 16
    assert info["run"]["model_args"] == cfg["model_args"]
    width = get_config("coatnet_micro").widths[2]
    assert tuple(conv1.shape[:2]) == (2 * width, width)  # the expansion the flag asked for (the model's own: 4x)
    assert get_config("coatnet_micro").transformer.head_dim != 16
    # Evaluation rebuilds the trained architecture and scores what training scored.
    code, out, err = _run(capsys, "eval", "--checkpoint", str(ckpt), "--precision", "fp32")
    assert code == 0, err
    assert json.loads(out)["top1"] == pytest.approx(final["val_top1"])
    # Fine-tuning the checkpoint keeps its architecture: the model args come with the model name.
    ft = finetune_config(str(ckpt))
    assert (ft.model, ft.model_args) == ("coatnet_micro", ("mbconv.expand_ratio=2", "transformer.head_dim=16"))
