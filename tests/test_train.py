"""Training engine: schedule, weight-decay groups, run folder contents, deterministic resume, atomic
checkpoints, EMA."""
import json
import math
import os

import pytest
import torch
from safetensors import safe_open

import coatnet
from coatnet.data import build_data
from coatnet.train import TrainConfig, get_recipe, list_recipes, train
from coatnet.train.checkpoint import load_model, read_checkpoint, read_checkpoint_info, save_weights_checkpoint
from coatnet.train.evaluate import evaluate, subset_indices
from coatnet.train.optim import WeightEMA, param_groups
from coatnet.train.redundant import redundant_parameters
from coatnet.train.runtime import setup_runtime
from coatnet.train.schedule import lr_at

FMNIST = "/usr/share/datasets/fashion-mnist"
needs_fmnist = pytest.mark.skipif(not os.path.isdir(FMNIST), reason="dataset-fashion-mnist not installed")
TINY = dict(train_subset=96, val_subset=64, batch_size=32, epochs=2, warmup_epochs=0.5, progress=False,
            quiet=True, threads=2, deterministic=True)


def test_lr_schedule_values():
    kw = dict(base_lr=1.0, total_steps=101, warmup_steps=10, min_lr=0.1)
    assert lr_at(0, **kw) == pytest.approx(0.1) and lr_at(4, **kw) == pytest.approx(0.5)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(55, **kw) == pytest.approx(0.55)  # cosine midpoint: halfway between peak and floor
    assert lr_at(100, **kw) == pytest.approx(0.1) and lr_at(500, **kw) == pytest.approx(0.1)
    assert lr_at(32, **kw, decay="linear") == pytest.approx(1.0 - 0.9 * 22 / 90)
    assert lr_at(7, 2.0, 50) == lr_at(7, 2.0, 50)  # a pure function of the step


def test_weight_decay_skips_norms_biases_and_bias_tables():
    model = coatnet.create_model("coatnet_nano", num_classes=10)
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert all(p.ndim >= 2 for p in decay["params"])
    assert any(n.endswith("relative_bias_table") for n in skipped) and "head.bias" in skipped
    assert any(".norm" in n and n.endswith("weight") for n in skipped)
    # every parameter is optimized, except those whose gradient is only roundoff (train/redundant.py)
    redundant = redundant_parameters(model)
    assert redundant and not redundant & {names[id(p)] for g in (decay, no_decay) for p in g["params"]}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters())) - len(redundant)


def test_ema_follows_its_formula():
    model = torch.nn.Linear(2, 1)
    ema = WeightEMA(model, 0.9)
    start = ema.state["weight"].clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.state["weight"], 0.9 * start + 0.1 * model.weight)


def test_recipes_are_named_documented_and_valid():
    assert {"default", "fashion-mnist-full", "paper"} <= set(list_recipes())
    for name in list_recipes():
        cfg = TrainConfig().replace(**get_recipe(name)).validate()
        assert cfg.recipe == name
    assert get_recipe("paper")["mixup"] == 0.8 and get_recipe("paper")["randaugment_n"] == 2
    with pytest.raises(ValueError, match="unknown recipe"):
        get_recipe("nope")


def test_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="img_size"):
        TrainConfig(img_size=0).validate()
    with pytest.raises(ValueError, match="unknown training setting"):
        TrainConfig().replace(learning_rate=1)
    with pytest.raises(ValueError, match="micro_batch_size"):
        TrainConfig(batch_size=8, micro_batch_size=16).validate()


@needs_fmnist
def test_run_folder_contents(tmp_path):
    out = tmp_path / "run"
    res = train(TrainConfig(**TINY, out=str(out), eval_train=True, ema_decay=0.9))
    assert {"train_loss", "train_top1", "val_top1", "val_top5", "seconds", "params", "train_eval_top1"} <= set(res)
    assert res["params"] == coatnet.count_params(coatnet.create_model(TrainConfig().model, num_classes=10, in_chans=1))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["classes"][0] == "T-shirt/top" and len(cfg["classes"]) == 10
    assert cfg["img_size"] == 32 and cfg["batch_size"] == 32 and cfg["steps_per_epoch"] == 3
    assert set(TrainConfig().to_dict()) <= set(cfg)
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    for r in lines:
        assert {"epoch", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "lr", "img_per_s",
                "seconds", "train_eval_top1"} <= set(r)
        assert 0 <= r["val_top1"] <= r["val_top5"] <= 100 and math.isfinite(r["train_loss"])
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("checkpoint-last.safetensors", "checkpoint-best.safetensors", "checkpoint-last.state.safetensors"):
        assert (out / name).is_file()
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
    model, spec, info = load_model(out / "checkpoint-last.safetensors")
    assert spec.classes[9] == "Ankle boot" and spec.in_chans == 1 and info["epoch"] == 2
    with safe_open(str(out / "checkpoint-last.state.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("optim.") for k in keys) and any(k.startswith("ema.") for k in keys)


@needs_fmnist
def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path):
    cfg = TrainConfig(**{**TINY, "epochs": 3}, drop_path=0.1, mixup=0.8, label_smoothing=0.1, randaugment_n=2)
    full = train(cfg.replace(out=str(tmp_path / "a")))
    # Interrupt mid-epoch 2 (step 5 of 9) and once more at an epoch end, then resume to the end.
    part = train(cfg.replace(out=str(tmp_path / "b"), stop_at_step=5, save_every=1))
    assert part["stopped_at_step"] == 5
    train(cfg.replace(out=str(tmp_path / "b"), resume=True, stop_at_step=6))
    resumed = train(cfg.replace(out=str(tmp_path / "b"), resume=True))
    a, _ = read_checkpoint(tmp_path / "a" / "checkpoint-last.safetensors")
    b, _ = read_checkpoint(tmp_path / "b" / "checkpoint-last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma = [json.loads(s) for s in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(s) for s in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    keys = ("epoch", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "lr")
    assert [[r[k] for k in keys] for r in ma] == [[r[k] for k in keys] for r in mb]
    assert full["val_top1"] == resumed["val_top1"]


@needs_fmnist
def test_eval_every_scores_every_nth_epoch_and_the_last_and_leaves_training_alone(tmp_path, caplog):
    cfg = TrainConfig(**{**TINY, "epochs": 5, "quiet": False}, ema_decay=0.9)
    every = train(cfg.replace(out=str(tmp_path / "every")))
    caplog.clear()
    with caplog.at_level("INFO"):
        sparse = train(cfg.replace(out=str(tmp_path / "sparse"), eval_every=2))
    printed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    ma, mb = ([json.loads(s) for s in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
              for d in ("every", "sparse"))
    assert [r["epoch"] for r in mb if "val_top1" in r] == [2, 4, 5]
    assert all(not {"val_loss", "val_top1", "val_top5"} & set(r) for r in mb if r["epoch"] in (1, 3))
    assert ["val_top1" in line for line in printed] == [False, True, False, True, True]
    # Evaluating is not training: the same losses every epoch, the same scores where both evaluated.
    assert [r["train_loss"] for r in ma] == [r["train_loss"] for r in mb]
    assert [(r["val_loss"], r["val_top1"]) for r in ma if r["epoch"] in (2, 4, 5)] == \
        [(r["val_loss"], r["val_top1"]) for r in mb if "val_top1" in r]
    assert sparse["val_top1"] == every["val_top1"] == mb[-1]["val_top1"]
    best = max((r for r in mb if "val_top1" in r), key=lambda r: r["val_top1"])
    assert read_checkpoint_info(tmp_path / "sparse" / "checkpoint-best.safetensors")["epoch"] == best["epoch"]
    with pytest.raises(ValueError, match="eval_every"):
        TrainConfig(eval_every=0).validate()


@needs_fmnist
def test_resume_without_checkpoint_starts_from_scratch_and_extends_epochs(tmp_path):
    out = tmp_path / "r"
    train(TrainConfig(**{**TINY, "epochs": 1}, out=str(out), resume=True))
    res = train(TrainConfig(**TINY, out=str(out), resume=True))
    assert res["epochs"] == 2 and len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint-last.safetensors"
    info = {"model_config": {}, "data": {}}
    save_weights_checkpoint(path, {"w": torch.ones(3)}, info)
    before = path.read_bytes()
    import coatnet.train.checkpoint as ck

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", crash)
    with pytest.raises(OSError):
        save_weights_checkpoint(path, {"w": torch.zeros(3)}, info)
    assert path.read_bytes() == before and os.listdir(tmp_path) == [path.name]


@needs_fmnist
def test_gradient_accumulation_keeps_the_step_count(tmp_path):
    res = train(TrainConfig(**{**TINY, "epochs": 1}, micro_batch_size=8))
    assert res["steps"] == 3 and math.isfinite(res["train_loss"])


@needs_fmnist
def test_nonfinite_loss_stops_with_the_step_named():
    from coatnet.train import NonFiniteLossError

    with pytest.raises(NonFiniteLossError, match=r"step \d+"):
        train(TrainConfig(**{**TINY, "epochs": 1}, lr=1e30, clip_grad=None, weight_decay=0))


def test_evaluate_builds_no_autograd_graph():
    """Evaluation runs under no_grad: no activations are kept for a backward pass that never comes."""
    from coatnet.data.datasets import DataSpec, TensorSource
    from coatnet.train.evaluate import evaluate
    from coatnet.train.runtime import setup_runtime

    seen = []

    class Probe(torch.nn.Linear):
        def forward(self, x):
            seen.append(torch.is_grad_enabled())
            return super().forward(x.flatten(1))

    source = TensorSource(torch.zeros(6, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 1, 0, 1, 0, 1]))
    spec = DataSpec("t", ("a", "b"), 1, 2, 1.0, (0.5,), (0.5,))
    result = evaluate(Probe(4, 2), source, torch.arange(6), spec, setup_runtime("cpu", threads=1), batch_size=4)
    assert result["n"] == 6 and seen == [False, False]


def test_small_training_set_is_repeated_within_an_epoch_with_fresh_augmentation():
    """min_epoch_images: each epoch passes over a small set several times, each pass a new permutation and
    (through indices shifted by the source's length) new augmentation draws."""
    from coatnet.train.run_data import epoch_data, load_data

    cfg = TrainConfig(train_subset=40, val_subset=10, batch_size=16, min_epoch_images=100, threads=1).validate()
    cfg, data = load_data(cfg)
    assert data.repeats == 3 and data.epoch_images == 120
    epoch = epoch_data(cfg, data, epoch=0, start=0)
    batches = list(epoch.batches)
    assert epoch.batch_sizes == [16] * 7 + [8]
    indices = torch.cat([b.indices for b in batches])
    n = len(data.train_src)
    assert sorted((indices % n).tolist()) == sorted(data.train_idx.tolist() * 3)
    assert sorted((indices // n).tolist()) == [0] * 40 + [1] * 40 + [2] * 40
    first = {int(i): b.images[j] for b in batches for j, i in enumerate(b.indices) if i < n}
    again = {int(i) % n: b.images[j] for b in batches for j, i in enumerate(b.indices) if n <= i < 2 * n}
    labels = {int(i) % n: int(y) for b in batches for i, y in zip(b.indices, b.labels)}
    assert all(labels[i] == int(data.train_src.labels[i]) for i in labels)
    # the same image, augmented anew: some repeats differ (a flip or crop drawn differently)
    assert sum(not torch.equal(first[i], again[i]) for i in first) > 10


@needs_fmnist
@pytest.mark.slow
def test_a_short_run_checkpoints_statistics_that_match_its_weights(tmp_path):
    """The issue's case: 2 epochs on 2,000 images. BatchNorm running averages trail the weights by ~1/momentum
    steps; precise BN (the default) re-estimates them before each evaluation and checkpoint, so the saved
    model scores its own training images in eval mode about as well as training saw them. Without it, the
    stale statistics sink eval-mode accuracy far below."""
    short = dict(train_subset=2000, val_subset=500, epochs=2, min_epoch_images=0, eval_train=True, progress=False,
                 quiet=True, threads=2, seed=0)
    res = train(TrainConfig(**short, out=str(tmp_path / "run")))
    assert abs(res["train_eval_top1"] - res["train_top1"]) < 8, res
    model, spec, _ = load_model(tmp_path / "run" / "checkpoint-last.safetensors")
    train_src, _, _ = build_data("fashion-mnist", img_size=spec.img_size)
    idx = subset_indices(len(train_src), 2000, 0, stream=1)
    saved = evaluate(model, train_src, idx, spec, setup_runtime("cpu", threads=2), tta_flip=True)
    assert abs(saved["top1"] - res["train_eval_top1"]) <= 0.1  # the checkpoint holds what was measured
    stale = train(TrainConfig(**short, precise_bn=0))
    assert stale["train_eval_top1"] < res["train_eval_top1"] - 10, (stale, res)
