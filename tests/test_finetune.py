"""`coatnet finetune`: the paper's recipe as defaults, the model from the checkpoint, the engine hooks."""
import json
from pathlib import Path

import pytest

from coatnet.cli import main
from coatnet.train import TrainConfig, train
from coatnet.train.finetune import FINETUNE_RECIPE, checkpoint_model_name, finetune_config

FMNIST = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(not FMNIST.is_dir(), reason="Fashion-MNIST IDX files not present")
TINY = dict(model="coatnet_nano", train_subset=64, val_subset=64, batch_size=32, epochs=1, progress=False, quiet=True,
            threads=1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train(TrainConfig(out=str(out), **TINY))
    return out / "checkpoint-last.safetensors"


def test_the_recipe_is_the_papers_with_an_ema_that_warms_up():
    assert FINETUNE_RECIPE == dict(epochs=30, lr=5e-5, schedule="constant", warmup_epochs=0.0, weight_decay=1e-8,
                                   ema_decay=0.9999, ema_warmup=True)


def test_a_file_without_our_metadata_needs_the_model_named(tmp_path):
    (tmp_path / "w.safetensors").write_bytes(b"")
    assert checkpoint_model_name(str(tmp_path / "w.safetensors")) is None
    with pytest.raises(ValueError, match="pass the model"):
        finetune_config(str(tmp_path / "w.safetensors"))
    cfg = finetune_config(str(tmp_path / "w.safetensors"), model="coatnet_0_rw_224", img_size=384, lr=None)
    assert (cfg.model, cfg.img_size, cfg.lr, cfg.schedule, cfg.pretrained) == (
        "coatnet_0_rw_224", 384, 5e-5, "constant", str(tmp_path / "w.safetensors"))


@needs_fmnist
def test_finetune_continues_from_the_checkpoint_at_a_new_size_with_decay_and_frozen_stages(checkpoint, tmp_path,
                                                                                           capsys):
    assert checkpoint_model_name(str(checkpoint)) == TINY["model"]
    with pytest.raises(ValueError, match="has 10 classes"):
        finetune_config(str(checkpoint), num_classes=7)
    code = main(["finetune", "--checkpoint", str(checkpoint), "--img-size", "64", "--epochs", "1",
                 "--train-subset", "64", "--val-subset", "64", "--batch-size", "32", "--layer-decay", "0.7",
                 "--freeze-stages", "2", "--ema-decay", "0", "--threads", "1", "--no-progress",
                 "--out", str(tmp_path / "ft"), "--num-classes", "10"])
    assert code == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert "initial_val_top1" in result and result["epochs"] == 1
    config = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert config["model_config"]["img_size"] == 64 and config["pretrained"] == str(checkpoint)
    assert (config["layer_decay"], config["freeze_stages"], config["weight_decay"]) == (0.7, 2, 1e-8)


def _eval(capsys, *argv) -> dict:
    code = main(["eval", *argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])


@needs_fmnist
def test_eval_at_another_size_resizes_the_tables_and_can_first_recalibrate_batchnorm(checkpoint, tmp_path, capsys):
    import dataclasses

    from coatnet.data import build_data
    from coatnet.models import create_model
    from coatnet.train.checkpoint import read_checkpoint, save_weights_checkpoint
    from coatnet.train.evaluate import evaluate, subset_indices
    from coatnet.train.runtime import setup_runtime

    # A 64-image run predicts nearly uniformly; a sharper head makes the input size visible in the loss.
    weights, info = read_checkpoint(checkpoint)
    weights["head.weight"] = weights["head.weight"] * 200
    sharp = tmp_path / "sharp.safetensors"
    save_weights_checkpoint(sharp, weights, info)
    args = ("--checkpoint", str(sharp), "--subset", "40", "--threads", "1", "--tta", "none")
    at32 = _eval(capsys, *args)
    assert _eval(capsys, *args, "--img-size", "32") == at32  # the checkpoint's own size: nothing changes
    at64 = _eval(capsys, *args, "--img-size", "64")
    assert at64["n"] == 40 and abs(at64["loss"] - at32["loss"]) > 1e-2
    # The same as the model fine-tuning starts from: built at 64 px from the file, tables resized on load.
    model = create_model("coatnet_nano", pretrained=str(sharp), img_size=64, in_chans=1).eval()
    _, val, spec = build_data("fashion-mnist", img_size=32)
    direct = evaluate(model, val, subset_indices(len(val), 40, 0, stream=7), dataclasses.replace(spec, img_size=64),
                      setup_runtime("cpu", threads=1))
    assert direct["top1"] == at64["top1"] and abs(direct["loss"] - at64["loss"]) < 1e-5
    recalibrated = _eval(capsys, *args, "--img-size", "64", "--recalibrate-bn", "50")
    assert abs(recalibrated["loss"] - at64["loss"]) > 1e-2
    assert _eval(capsys, *args, "--img-size", "64", "--recalibrate-bn", "50") == recalibrated  # seeded images
    assert main(["eval", *args, "--img-size", "48"]) == 1
    assert "not a multiple of 32" in capsys.readouterr().err
    assert main(["eval", *args, "--recalibrate-bn", "-1"]) == 1
    assert "recalibrate_bn=-1" in capsys.readouterr().err


@needs_fmnist
def test_finetune_recalibrates_batchnorm_at_the_new_size_before_freezing(checkpoint, tmp_path, capsys):
    """All four stages frozen: their BatchNorms keep, through training, the statistics re-estimated at 64 px
    on N seeded training images of the run, not the 32-px ones of the checkpoint."""
    import torch

    from coatnet.data import build_data
    from coatnet.models import create_model
    from coatnet.train.checkpoint import read_checkpoint
    from coatnet.train.evaluate import subset_indices
    from coatnet.train.recalibrate import recalibrate_batchnorm
    from coatnet.train.runtime import setup_runtime

    code = main(["finetune", "--checkpoint", str(checkpoint), "--img-size", "64", "--epochs", "1",
                 "--train-subset", "64", "--val-subset", "32", "--batch-size", "32", "--freeze-stages", "4",
                 "--recalibrate-bn", "40", "--ema-decay", "0", "--threads", "1", "--no-progress", "--no-channels-last",
                 "--precision", "fp32", "--out", str(tmp_path / "ft")])  # compared below with an fp32 recalibration
    err = capsys.readouterr().err  # a note of the library's, through logging
    assert code == 0 and "re-estimated on 40 training images at 64x64" in err
    assert json.loads((tmp_path / "ft" / "config.json").read_text())["recalibrate_bn"] == 40
    tuned, _ = read_checkpoint(tmp_path / "ft" / "checkpoint-last.safetensors")
    base, _ = read_checkpoint(checkpoint)

    model = create_model("coatnet_nano", pretrained=str(checkpoint), img_size=64, in_chans=1)
    train_src, _, spec = build_data("fashion-mnist", img_size=64)
    train_idx = subset_indices(len(train_src), 64, 0, stream=1)
    calib = train_idx[subset_indices(64, 40, 0, stream=3)]
    recalibrate_batchnorm(model, train_src, calib, spec, setup_runtime("cpu", threads=1), batch_size=500)
    frozen = [k for k in tuned if k.startswith("stages.") and ".running_" in k]
    assert len(frozen) == 20  # mean and variance of the ten BatchNorms in the four stages
    recalibrated = model.state_dict()
    for key in frozen:
        torch.testing.assert_close(tuned[key], recalibrated[key], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(tuned["stages.0.blocks.0.norm1.running_var"],
                              base["stages.0.blocks.0.norm1.running_var"], rtol=1e-2)


def test_finetune_from_a_tag_takes_its_model_and_its_preprocessing(monkeypatch, tmp_path, colour_images, capsys):
    """`--checkpoint TAG` with the weights in the Hugging Face cache (as timm leaves them): the model is the
    tag's, the head is replaced for the 4 colour classes, and the inputs are normalised with the tag's
    mean/std (0.5, not the ImageNet statistics of image folders) and evaluated with its crop (0.9)."""
    import torch
    from safetensors.torch import save_file

    from coatnet.models import create_model
    from coatnet.train.checkpoint import load_model

    tag = "coatnet_nano_rw_224.sw_in1k"
    snapshot = tmp_path / "hf" / f"models--timm--{tag}" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    src = create_model("coatnet_nano_rw_224")
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(snapshot / "model.safetensors"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    cfg = finetune_config(tag, data=str(colour_images), img_size=32)
    assert cfg.model == "coatnet_nano_rw_224" and cfg.pretrained == tag
    out = tmp_path / "ft"
    code = main(["finetune", "--checkpoint", tag, "--data", str(colour_images), "--img-size", "32",
                 "--num-classes", "4", "--epochs", "1", "--batch-size", "24", "--threads", "1", "--no-progress",
                 "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "preprocessing of coatnet_nano_rw_224.sw_in1k: mean (0.5, 0.5, 0.5)" in printed.err
    model, spec, _ = load_model(out / "checkpoint-last.safetensors")
    assert (spec.mean, spec.std, spec.crop_fraction) == ((0.5,) * 3, (0.5,) * 3, 0.9)
    assert model.num_classes == 4
    # The stem started from the published weights (one epoch at lr 5e-5 barely moves it).
    torch.testing.assert_close(model.state_dict()["stem.layers.0.weight"], src.state_dict()["stem.layers.0.weight"],
                               atol=2e-3, rtol=0)
