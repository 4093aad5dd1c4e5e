"""`coatnet finetune`: the paper's recipe as defaults, the model from the checkpoint, the engine hooks."""
import json
from pathlib import Path

import pytest

from coatnet.cli import main
from coatnet.train import TrainConfig, train
from coatnet.train.finetune import FINETUNE_RECIPE, checkpoint_model_name, finetune_config

FMNIST = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(not FMNIST.is_dir(), reason="Fashion-MNIST IDX files not present")
TINY = dict(train_subset=64, val_subset=64, batch_size=32, epochs=1, progress=False, quiet=True, threads=1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train(TrainConfig(out=str(out), **TINY))
    return out / "checkpoint-last.safetensors"


def test_the_recipe_is_the_papers():
    assert FINETUNE_RECIPE == dict(epochs=30, lr=5e-5, min_lr=5e-5, warmup_epochs=0.0, weight_decay=1e-8,
                                   ema_decay=0.9999)


def test_a_file_without_our_metadata_needs_the_model_named(tmp_path):
    (tmp_path / "w.safetensors").write_bytes(b"")
    assert checkpoint_model_name(str(tmp_path / "w.safetensors")) is None
    with pytest.raises(ValueError, match="pass the model"):
        finetune_config(str(tmp_path / "w.safetensors"))
    cfg = finetune_config(str(tmp_path / "w.safetensors"), model="coatnet_0_rw_224", img_size=384, lr=None)
    assert (cfg.model, cfg.img_size, cfg.lr, cfg.min_lr, cfg.pretrained) == (
        "coatnet_0_rw_224", 384, 5e-5, 5e-5, str(tmp_path / "w.safetensors"))


@needs_fmnist
def test_finetune_continues_from_the_checkpoint_at_a_new_size_with_decay_and_frozen_stages(checkpoint, tmp_path,
                                                                                           capsys):
    assert checkpoint_model_name(str(checkpoint)) == TrainConfig().model
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
