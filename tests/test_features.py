"""`create_model(name, features_only=True, out_indices=...)`: timm's backbone convention (stage maps and
feature_info), any input whose sides are multiples of 32, gradients through every stage, and a small
FPN-style detection head that learns on it."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import coatnet
from coatnet.models.features import CoAtNetFeatures

pytestmark = pytest.mark.usefixtures("one_thread")

# name, overrides, expected (channels, reductions) for out_indices (0, 1, 2, 3, 4)
VARIANTS = [
    ("coatnet_nano", {}, ([32, 32, 64, 128, 256], [2, 4, 8, 16, 32])),
    ("coatnet_pico", {"in_chans": 1}, ([32, 48, 96, 192, 384], [2, 4, 8, 16, 32])),
    ("coatnet_nano", {"layout": "C-T-T-T"}, ([32, 32, 64, 128, 256], [2, 4, 8, 16, 32])),
    # timm's split-stage nano: S3 is MBConv then Transformer blocks at one stride, reported once
    ("coatnet_nano_cc_224", {}, ([64, 64, 128, 256, 512], [2, 4, 8, 16, 32])),
]


@pytest.mark.parametrize("name, overrides, expected", VARIANTS, ids=lambda v: str(v)[:40])
@pytest.mark.parametrize("size", [(32, 32), (64, 96), (96, 64)])
def test_stage_maps_have_the_channels_and_strides_feature_info_states(name, overrides, expected, size):
    model = coatnet.create_model(name, features_only=True, out_indices=(1, 2, 3, 4), img_size=64, **overrides).eval()
    channels, reductions = expected
    info = model.feature_info
    assert info.channels() == channels[1:] and info.reduction() == reductions[1:]
    assert [d["num_chs"] for d in info] == channels[1:] and [d["index"] for d in info] == [1, 2, 3, 4]
    assert info.channels(-1) == channels[-1] and len(info) == 4
    x = torch.randn(2, overrides.get("in_chans", 3), *size)
    with torch.no_grad():
        maps = model(x)
    assert [tuple(m.shape) for m in maps] == [(2, c, size[0] // r, size[1] // r)
                                               for c, r in zip(channels[1:], reductions[1:])]


def test_feature_maps_are_the_networks_own_intermediates_and_its_weights_load():
    full = coatnet.create_model("coatnet_nano", num_classes=5, img_size=64).eval()
    backbone = coatnet.create_model("coatnet_nano", features_only=True, num_classes=5, img_size=64).eval()
    missing, unexpected = backbone.load_state_dict(full.state_dict(), strict=False)
    assert missing == [] and set(k.split(".")[0] for k in unexpected) == {"norm", "head"}
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        maps, reference = backbone(x), full.forward_intermediates(x)
    # The first four are the same tensors; the last of forward_intermediates is normalised, timm's is not.
    for got, want in zip(maps[:4], reference[:4]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(full.norm(maps[4].permute(0, 2, 3, 1)).permute(0, 3, 1, 2), reference[4])
    assert backbone.feature_info.module_name() == ["stem", "stages.0", "stages.1", "stages.2", "stages.3"]


def test_only_the_stages_up_to_the_deepest_output_are_kept():
    model = coatnet.create_model("coatnet_nano", features_only=True, out_indices=(0, 2))
    assert len(model.stages) == 2 and not hasattr(model, "head")
    assert model.feature_info.reduction() == [2, 8]
    x = torch.randn(1, 3, 40, 48)  # multiples of 8 suffice for a stride-8 output
    assert [tuple(m.shape[-2:]) for m in model(x)] == [(20, 24), (5, 6)]


@pytest.mark.parametrize("indices, says", [((5,), "5 is out of range; this model has 5 feature maps"),
                                           ((2, 1), "increasing order"), ((1, 1), "distinct"), ((), "distinct")])
def test_bad_out_indices_are_named(indices, says):
    with pytest.raises(ValueError, match=says):
        coatnet.create_model("coatnet_nano", features_only=True, out_indices=indices)


def test_negative_indices_count_from_the_end_and_sizes_must_fit():
    model = coatnet.create_model("coatnet_nano", features_only=True, out_indices=(-2, -1))
    assert model.out_indices == (3, 4)
    with pytest.raises(ValueError, match="input size 48x64 is not a multiple of 32"):
        model(torch.randn(1, 3, 48, 64))
    with pytest.raises(ValueError, match="out_indices applies with features_only=True"):
        coatnet.create_model("coatnet_nano", out_indices=(1,))


def test_gradients_reach_every_parameter_and_the_input():
    model = coatnet.create_model("coatnet_nano", features_only=True, out_indices=(1, 2, 3, 4), img_size=64)
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    sum(m.square().mean() for m in model(x)).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert no_grad == []
    assert x.grad.abs().sum() > 0
    # every stage's weights move the loss (a dead branch would leave a whole stage at zero gradient)
    for i in range(4):
        assert sum(p.grad.abs().sum() for n, p in model.named_parameters() if n.startswith(f"stages.{i}.")) > 0


class TinyFPNDetector(nn.Module):
    """An FPN (lateral 1x1, top-down nearest upsampling and sum, 3x3 smoothing) over the backbone's maps,
    and a CenterNet-style head: a per-cell objectness logit at the finest map's stride."""

    def __init__(self, backbone: nn.Module, width: int = 32):
        super().__init__()
        self.backbone = backbone
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in backbone.feature_info.channels())
        self.smooth = nn.Conv2d(width, width, 3, padding=1)
        self.head = nn.Conv2d(width, 1, 1)

    def forward(self, x):
        maps = [lat(m) for lat, m in zip(self.lateral, self.backbone(x))]
        y = maps[-1]
        for m in reversed(maps[:-1]):
            y = m + F.interpolate(y, size=m.shape[-2:], mode="nearest")
        return self.head(F.relu(self.smooth(y)))[:, 0]  # (B, H/4, W/4)


def _boxes(n: int, size: int, generator: torch.Generator):
    """Images with one bright 16x16 square on noise, and its centre cell as the target at stride 4."""
    x = torch.randn(n, 3, size, size, generator=generator) * 0.3
    target = torch.zeros(n, size // 4, size // 4)
    for i in range(n):
        y0, x0 = torch.randint(0, size - 16, (2,), generator=generator).tolist()
        x[i, :, y0:y0 + 16, x0:x0 + 16] += 2.0
        target[i, (y0 + 8) // 4, (x0 + 8) // 4] = 1.0
    return x, target


@pytest.mark.parametrize("layout", ["C-C-T-T", "C-T-T-T"])
def test_a_tiny_fpn_detection_head_learns_on_the_features(layout):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    backbone = coatnet.create_model("coatnet_nano", features_only=True, out_indices=(1, 2, 3, 4), img_size=64,
                                    layout=layout)
    assert isinstance(backbone, CoAtNetFeatures)
    detector = TinyFPNDetector(backbone)
    optimizer = torch.optim.AdamW(detector.parameters(), lr=2e-3)
    x, target = _boxes(16, 64, g)
    weight = torch.where(target > 0, 30.0, 1.0)  # one positive cell among 256

    def loss_fn():
        return F.binary_cross_entropy_with_logits(detector(x), target, weight=weight)

    losses = []
    for _ in range(25):
        optimizer.zero_grad()
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    detector.eval()
    with torch.no_grad():
        heat = detector(x)
    peak = heat.flatten(1).argmax(1)
    hits = (peak == target.flatten(1).argmax(1)).float().mean().item()
    assert losses[-1] < 0.5 * losses[0], losses
    assert hits >= 0.5, hits  # the peak lands on the square's centre cell in most training images
