"""The flags of `coatnet train` and `coatnet finetune` are TrainConfig's fields: each field's default, help,
choices and flag live in one place (train/config.py), the parsers are built from them, and `replace(x=None)`
sets None."""
from __future__ import annotations

import argparse
import dataclasses
import shlex

import pytest

import coatnet.cli.config_flags
import coatnet.train.config
from coatnet.cli import build_parser
from coatnet.cli.train import build_config
from coatnet.publish import train_command
from coatnet.train.config import TrainConfig, setting
from coatnet.train.runtime import PRECISIONS
from coatnet.train.schedule import SCHEDULES

# Fields no command has a flag for, and why.
FLAGLESS = {
    "pretrained": "`coatnet finetune --checkpoint` sets it",
    "eval_before": "`coatnet finetune` sets it",
    "resume": "`coatnet train --resume DIR` sets it with out",
    "recipe": "`coatnet train --recipe NAME` applies a recipe and records it",
    "betas": "Python and config.json only",
    "eval_batch_size": "Python and config.json only",
}


def _command(name: str) -> argparse.ArgumentParser:
    parser = build_parser(name)
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]


def _fields_set(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """TrainConfig field -> the action of `parser` that sets it."""
    settings = TrainConfig.settings()
    return {field: action for action in parser._actions for field in getattr(action, "fields", (action.dest,))
            if field in settings}


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    return " ".join(parser._get_formatter()._format_action(action).split())


def test_every_field_has_a_flag_or_is_listed_as_flagless():
    settings = TrainConfig.settings()
    assert {name for name, s in settings.items() if not s.flags} == set(FLAGLESS)
    flagged = {name for name, s in settings.items() if s.flags}
    train, finetune = _fields_set(_command("train")), _fields_set(_command("finetune"))
    assert flagged - set(train) == {"layer_decay", "freeze_stages", "recalibrate_bn"}  # fine-tuning's own
    assert flagged <= set(train) | set(finetune)


def test_each_flag_is_spelled_as_its_setting_says():
    settings = TrainConfig.settings()
    for command in ("train", "finetune"):
        for field, action in _fields_set(_command(command)).items():
            if settings[field].flags:
                assert tuple(action.option_strings) == settings[field].flags, (command, field)


def test_choices_in_the_parser_are_the_fields_and_the_libraries():
    actions = _fields_set(_command("train"))
    assert actions["schedule"].choices is SCHEDULES == TrainConfig.settings()["schedule"].choices
    assert actions["precision"].choices is PRECISIONS == TrainConfig.settings()["precision"].choices
    with pytest.raises(ValueError, match=r"precision='fp16' must be one of 'auto', 'fp32', 'bf16'"):
        TrainConfig(precision="fp16").validate()


def test_the_help_states_each_fields_default():
    parser, d = _command("train"), TrainConfig()
    actions = _fields_set(parser)
    assert _help(parser, actions["lr"]).endswith("peak learning rate (AdamW) (default: 0.003)")
    assert _help(parser, actions["crop_scale"]).endswith("(default: 1.0 1.0)")
    assert _help(parser, actions["randaugment_n"]).endswith("(default: 0 15.0)")
    assert _help(parser, actions["channels_last"]).endswith("(default: on)")
    assert _help(parser, actions["train_subset"]).endswith("(default: all)")  # what None means
    assert _help(parser, actions["model_args"]).endswith("the flag may repeat) (default: none)")  # an empty tuple
    assert _help(parser, actions["out"]).endswith("(default: runs/<recipe>-<time>)")  # what the command does
    for field, action in actions.items():
        s = TrainConfig.settings()[field]
        if not s.flags or action.nargs == 0 or len(getattr(action, "fields", ())) > 1 or field == "out":
            continue
        value = getattr(d, field)
        shown = s.none if value is None or value == () else ("on" if value else "off") if isinstance(value, bool) else (
            " ".join(map(str, value)) if isinstance(value, tuple) else str(value))
        assert action.help.endswith(f"(default: {shown})"), field
    finetune = _command("finetune")
    assert _help(finetune, _fields_set(finetune)["lr"]).endswith("(default: 5e-05)")  # the fine-tuning recipe's


def test_a_changed_default_help_or_choice_changes_the_parser(monkeypatch):
    @dataclasses.dataclass(frozen=True)
    class Changed(TrainConfig):
        lr: float = setting(0.5, "--lr", "the learning rate at its peak")
        schedule: str = setting("step", "--schedule", "after warmup", choices=("step", "cosine"))

    for module in (coatnet.train.config, coatnet.cli.config_flags):
        monkeypatch.setattr(module, "TrainConfig", Changed)
    parser = _command("train")
    actions = _fields_set(parser)
    assert _help(parser, actions["lr"]).endswith("the learning rate at its peak (default: 0.5)")
    assert actions["schedule"].choices == ("step", "cosine")
    assert "(default: step)" in _help(parser, actions["schedule"])


def test_replace_none_sets_none():
    cfg = TrainConfig(stop_at_step=5, threads=2)
    assert TrainConfig().replace(clip_grad=None).clip_grad is None
    assert cfg.replace(stop_at_step=None, threads=None).stop_at_step is None
    assert cfg.replace(stop_at_step=None).threads == 2  # only what is named changes


def test_clipping_off_is_none_and_zero_is_taken_as_none_everywhere():
    assert TrainConfig(clip_grad=0).clip_grad is None
    assert TrainConfig().replace(clip_grad=0.0).clip_grad is None
    assert TrainConfig.from_dict({"clip_grad": 0}).clip_grad is None  # a config.json written with 0
    assert build_config(build_parser("train").parse_args(["train", "--clip-grad", "0"])).clip_grad is None
    assert build_config(build_parser("train").parse_args(["train", "--clip-grad", "0.5"])).clip_grad == 0.5
    with pytest.raises(ValueError, match="clip_grad=False"):
        TrainConfig(clip_grad=False).validate()


def test_flags_left_out_are_not_settings():
    # What the CLI passes to replace() is only what was typed: a None there would now set None.
    args = build_parser("train").parse_args(["train", "--epochs", "2"])
    cfg = build_config(args)
    assert {k for k in vars(args) if k in TrainConfig.settings()} == {"epochs"}
    assert (cfg.epochs, cfg.clip_grad, cfg.data_dir) == (2, 1.0, None)
    assert cfg.out.startswith("runs/default-")


@pytest.mark.parametrize("argv, expected", [
    (["--no-augment"], dict(augment=False)),
    (["--no-tta"], dict(tta_flip=False)),
    (["--randaugment", "2", "15"], dict(randaugment_n=2, randaugment_m=15.0)),
    (["--crop-scale", "0.08", "1"], dict(crop_scale=(0.08, 1.0))),
    (["--random-erase", "0.25"], dict(random_erase=0.25)),
    (["--channels-last"], dict(channels_last=True)),
    (["--no-channels-last"], dict(channels_last=False)),
    (["--fsdp"], dict(fsdp=True)),
    (["--no-fsdp"], dict(fsdp=False)),
    (["--no-sync-bn"], dict(sync_bn=False)),
    (["--ema-warmup"], dict(ema_warmup=True)),
    (["--no-ema-warmup"], dict(ema_warmup=False)),
    (["--no-progress", "--quiet", "--strict"], dict(progress=False, quiet=True, strict=True)),
    (["--compile", "--deterministic", "--eval-train", "--skip-nonfinite"],
     dict(compile=True, deterministic=True, eval_train=True, skip_nonfinite=True)),
    (["--schedule", "linear", "--precision", "fp32"], dict(schedule="linear", precision="fp32")),
])
def test_every_existing_spelling_still_sets_its_field(argv, expected):
    cfg = build_config(build_parser("train").parse_args(["train", *argv]))
    assert {k: getattr(cfg, k) for k in expected} == expected


@pytest.mark.parametrize("name", ["random_erase", "hflip"])
def test_a_probability_outside_0_to_1_is_refused(name):
    assert TrainConfig(**{name: 1.0}).validate() and TrainConfig(**{name: 0.0}).validate()
    for bad in (1.5, -0.1):
        with pytest.raises(ValueError, match=f"{name}={bad} must be a probability in \\[0, 1\\]"):
            TrainConfig(**{name: bad}).validate()


def test_randaugment_ops_must_be_a_whole_number(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser("train").parse_args(["train", "--randaugment", "1.5", "9"])
    assert e.value.code == 2 and "invalid int value: '1.5'" in capsys.readouterr().err


def test_a_runs_command_sets_back_every_flagged_setting():
    cfg = TrainConfig(tta_flip=False, channels_last=False, ema_warmup=True, fsdp=True, sync_bn=False, augment=False,
                      clip_grad=None, randaugment_n=2, randaugment_m=9.0, crop_scale=(0.5, 1.0), strict=True,
                      stop_at_step=9, schedule="linear", out="runs/x", eval_batch_size=100)
    command = train_command(cfg.to_dict())
    words = shlex.split(command)
    assert "--eval-batch-size" not in words  # no such flag: left out, not written as one that does not parse
    again = build_config(build_parser("train").parse_args(words[1:]))
    flagless = set(FLAGLESS) | {"progress", "quiet"}
    assert {k: v for k, v in again.to_dict().items() if k not in flagless} == {
        k: v for k, v in cfg.to_dict().items() if k not in flagless}
