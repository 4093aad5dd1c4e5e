"""BatchNorm recalibration: running statistics become the averages over the given images at their size."""
import pytest
import torch
from torch import nn

from coatnet.data.datasets import DataSpec, TensorSource
from coatnet.data.transforms import normalize
from coatnet.models import create_model
from coatnet.models.transfer import freeze_stages
from coatnet.train.recalibrate import batchnorm_layers, recalibrate_batchnorm
from coatnet.train.runtime import setup_runtime

SPEC = DataSpec("toy", tuple("abc"), 1, 32, 1.0, (0.5,), (0.25,))


def _source(n: int, side: int = 28, seed: int = 0) -> TensorSource:
    g = torch.Generator().manual_seed(seed)
    return TensorSource(torch.randint(0, 256, (n, 1, side, side), generator=g, dtype=torch.uint8),
                        torch.randint(0, 3, (n,), generator=g))


def test_statistics_are_the_exact_averages_over_equal_batches_and_nothing_else_changes():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=0.3)
    model = nn.Sequential(conv, bn, nn.Dropout(0.5)).train()
    model[2].eval()  # a mixed-mode model: every module's own mode must come back
    bn.running_mean.fill_(7.0)
    bn.running_var.fill_(9.0)
    bn.num_batches_tracked.fill_(123)
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "tracked" not in k}
    source = _source(16)
    used = recalibrate_batchnorm(model, source, torch.arange(16), SPEC, setup_runtime("cpu"), batch_size=8)
    assert used == 16
    # What the BatchNorm sees: the eval transform (28 -> 32 bilinear), normalised, through the conv.
    batches = list(source.batches([torch.arange(8), torch.arange(8, 16)], SPEC))
    with torch.no_grad():
        feats = [conv(normalize(b.images, SPEC.mean, SPEC.std)) for b in batches]
    assert feats[0].shape[-1] == 32
    mean = torch.cat(feats).mean((0, 2, 3))  # equal batches: the mean of batch means is the overall mean
    var = torch.stack([f.var((0, 2, 3), unbiased=True) for f in feats]).mean(0)
    torch.testing.assert_close(bn.running_mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, var, rtol=1e-5, atol=1e-6)
    assert bn.momentum == 0.3 and int(bn.num_batches_tracked) == 123
    assert model.training and conv.training and bn.training and not model[2].training
    for k, v in weights.items():
        assert torch.equal(model.state_dict()[k], v), k


def test_a_batchnorm_held_in_eval_mode_keeps_its_statistics_and_the_rest_follow_the_new_size():
    torch.manual_seed(0)
    model = create_model("coatnet_nano", num_classes=3, img_size=32, in_chans=1)
    layers = batchnorm_layers(model)
    for m in layers:  # stand-ins for statistics learned elsewhere
        m.running_mean.fill_(0.5)
        m.running_var.fill_(2.0)
    freeze_stages(model, 1)  # the stem and the first stage are held in eval mode by a forward hook
    frozen = set(batchnorm_layers(model.stem)) | set(batchnorm_layers(model.stages[0]))
    assert frozen and len(frozen) < len(layers)
    spec64 = DataSpec("toy", tuple("abc"), 1, 64, 1.0, (0.5,), (0.25,))
    model.set_input_size(64)
    recalibrate_batchnorm(model, _source(6), torch.arange(6), spec64, setup_runtime("cpu"), batch_size=3)
    for m in layers:
        unchanged = bool((m.running_mean == 0.5).all() and (m.running_var == 2.0).all())
        assert unchanged == (m in frozen)


def test_no_images_or_no_batchnorm_is_a_no_op():
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
    model[1].running_mean.fill_(3.0)
    assert recalibrate_batchnorm(model, _source(4), torch.arange(0), SPEC, setup_runtime("cpu")) == 0
    assert (model[1].running_mean == 3.0).all()
    assert recalibrate_batchnorm(nn.Conv2d(1, 2, 1), _source(4), torch.arange(4), SPEC, setup_runtime("cpu")) == 0


def test_a_failing_pass_leaves_every_statistic_as_it_was():
    model = nn.Sequential(nn.BatchNorm2d(1), nn.Conv2d(1, 2, 1), nn.BatchNorm2d(3))  # 2 channels into a 3-wide BN
    for m in (model[0], model[2]):
        m.running_mean.fill_(4.0)
    with pytest.raises(RuntimeError):
        recalibrate_batchnorm(model, _source(4), torch.arange(4), SPEC, setup_runtime("cpu"))
    assert (model[0].running_mean == 4.0).all() and (model[2].running_mean == 4.0).all()
    assert model[0].momentum == 0.1 and model.training
