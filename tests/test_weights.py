"""Weights files: safetensors round trip, refusal of hostile or mismatched files, atomic writes."""
import logging
import pickle

import pytest
import torch

import coatnet
from coatnet.models.weights import load_pretrained, read_state_dict, save_weights
from coatnet.utils import atomic_write

SMALL = dict(depths=(1, 1, 1, 1, 1), widths=(16, 16, 32, 32, 64), head_dim=16, img_size=32)


def small(**kw):
    return coatnet.create_model("coatnet_pico", **{**SMALL, "num_classes": 4, **kw})


def test_weights_round_trip_through_safetensors(tmp_path):
    src, dst = small(), small()
    save_weights(src, tmp_path / "w.safetensors")
    load_pretrained(dst, tmp_path / "w.safetensors")
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(src.eval()(x), dst.eval()(x))


class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_booby_trapped_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"stem.weight": _Payload(str(marker))}))
    with pytest.raises(ValueError, match="refusing to unpickle"):
        read_state_dict(path)
    assert not marker.exists()
    with pytest.raises(ValueError):
        coatnet.create_model("coatnet_pico", **SMALL, pretrained=str(path))
    assert not marker.exists()


def test_a_checkpoint_of_timms_train_script_loads(tmp_path):
    """timm's train.py writes {"state_dict", "optimizer", "args": argparse.Namespace, ...} to .pth.tar;
    weights saved from a DistributedDataParallel wrapper carry "module." prefixes."""
    import argparse

    src = small()
    state = {f"module.{k}": v for k, v in src.state_dict().items()}
    torch.save({"epoch": 3, "arch": "coatnet_pico", "state_dict": state, "optimizer": {"state": {}},
                "args": argparse.Namespace(model="coatnet_pico", lr=1e-3), "version": 2},
               tmp_path / "model_best.pth.tar")
    dst = coatnet.create_model("coatnet_pico", **SMALL, pretrained=str(tmp_path / "model_best.pth.tar"))
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(src.eval()(x), dst.eval()(x))
    assert dst.num_classes == 4


def test_a_malformed_safetensors_file_is_refused(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        read_state_dict(path)


def test_a_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        read_state_dict(tmp_path / "nope.safetensors")


def test_a_head_of_another_class_count_is_dropped_with_a_message(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="coatnet")
    src = small(num_classes=4)
    save_weights(src, tmp_path / "w.safetensors")
    dst = small(num_classes=9)
    head_before = dst.head.weight.clone()
    load_pretrained(dst, tmp_path / "w.safetensors")
    assert "classifier for 4 classes dropped" in caplog.text
    assert torch.equal(dst.head.weight, head_before)
    torch.testing.assert_close(dst.stem.layers[0].weight, src.stem.layers[0].weight)


def test_weights_of_another_architecture_are_refused(tmp_path):
    save_weights(small(), tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="does not fit this architecture"):
        load_pretrained(small(widths=(16, 16, 32, 32, 128)), tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="missing"):
        load_pretrained(small(depths=(1, 1, 1, 2, 1)), tmp_path / "w.safetensors")


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "ckpt.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_write(path) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("disk full")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.bin"]
    with atomic_write(path) as tmp:
        tmp.write_bytes(b"new")
    assert path.read_bytes() == b"new"


def _with_old_keys(state: dict) -> dict:
    """`state` as versions before the position-bias plug-in slot named it (the attention held its table)."""
    return {k.replace("attn.position_bias.relative_bias_table", "attn.relative_bias_table"): v
            for k, v in state.items()}


def test_files_written_with_the_keys_of_earlier_versions_load(tmp_path):
    from safetensors.torch import save_file

    from coatnet.data import DataSpec
    from coatnet.train.checkpoint import load_model, load_train_state, save_train_state, save_weights_checkpoint

    model = coatnet.create_model("coatnet_pico", img_size=32, num_classes=3).eval()
    old = _with_old_keys(model.state_dict())
    assert "stages.3.blocks.0.attn.relative_bias_table" in old
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    # a weights file (pretrained=, Hub folders)
    save_file(old, str(tmp_path / "old.safetensors"))
    loaded = coatnet.create_model("coatnet_pico", img_size=32, num_classes=3,
                                  pretrained=str(tmp_path / "old.safetensors"))
    torch.testing.assert_close(loaded.eval()(x), expected, rtol=0, atol=0)
    # a checkpoint (coatnet eval, predict, save-pretrained)
    spec = DataSpec("colours", ("a", "b", "c"), 3, 32, 1.0, (0.5,) * 3, (0.5,) * 3)
    save_weights_checkpoint(tmp_path / "checkpoint-best.safetensors", old,
                            {"model_config": model.config.to_dict(), "data": spec.to_dict()})
    loaded, _, _ = load_model(tmp_path / "checkpoint-best.safetensors")
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
    # a training state (resume)
    ema = {k: v.clone() for k, v in old.items()}
    save_train_state(tmp_path / "state.safetensors", old, ema, {"state": {}, "param_groups": []}, {"epoch": 1})
    state = load_train_state(tmp_path / "state.safetensors")
    assert state["model"].keys() == state["ema"].keys() == model.state_dict().keys()
