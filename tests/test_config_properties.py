"""Property-based specifications of the config: every accepted config builds and runs; every
rejected one raises ValueError naming a field."""
import dataclasses
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coatnet.models import CoAtNet, CoAtNetConfig, MBConvConfig, TransformerConfig

FIELDS = {f.name for f in dataclasses.fields(CoAtNetConfig)} | {
    f.name for cls in (MBConvConfig, TransformerConfig) for f in dataclasses.fields(cls)}

layouts = st.sampled_from(["C-C-C-C", "C-C-C-T", "C-C-T-T", "C-T-T-T"])


@st.composite
def valid_configs(draw):
    head_dim = draw(st.sampled_from([8, 16]))
    widths = tuple(head_dim * draw(st.integers(1, 3)) for _ in range(5))
    cfg = CoAtNetConfig(
        depths=tuple(draw(st.integers(1, 2)) for _ in range(5)),
        widths=widths,
        layout=draw(layouts),
        mbconv=MBConvConfig(expand_ratio=draw(st.sampled_from([1.0, 2.0, 4.0])),
                            expand_from=draw(st.sampled_from(["input", "output"])),
                            se_ratio=draw(st.sampled_from([0.0, 0.25])),
                            downsample=draw(st.sampled_from(["conv1x1", "dwconv"]))),
        transformer=TransformerConfig(head_dim=head_dim, mlp_ratio=draw(st.sampled_from([1.0, 4.0])),
                                      norm=draw(st.sampled_from(["layernorm", "batchnorm"])),
                                      attention_bias=draw(st.sampled_from(["relative", "relative_post", "none"]))),
        pool_type=draw(st.sampled_from(["avg", "max"])),
        in_chans=draw(st.integers(1, 4)),
        num_classes=draw(st.integers(0, 5)),
        img_size=(32 * draw(st.integers(1, 3)), 32 * draw(st.integers(1, 3))),
    )
    return cfg


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=valid_configs(), h=st.integers(1, 3), w=st.integers(1, 3), batch=st.integers(1, 2))
def test_every_accepted_config_builds_and_runs_on_any_valid_size(cfg, h, w, batch):
    model = CoAtNet(cfg).eval()
    out = model(torch.randn(batch, cfg.in_chans, 32 * h, 32 * w))
    assert out.shape == (batch, cfg.num_classes or cfg.num_features)
    assert torch.isfinite(out).all()


bad_values = st.sampled_from([
    ("depths", (2, 2, -1, 2, 2)), ("depths", (2, 2, 2)), ("widths", (64, 96, 192, 384, "768")),
    ("layout", "C-C-T"), ("layout", "T-T-T-T-T"), ("layout", "C-C-Q-T"), ("layout", 7),
    ("head_dim", 0), ("head_dim", 7), ("head_dim", 2.5), ("mlp_ratio", 0), ("expand_ratio", -1),
    ("se_ratio", -0.5), ("downsample", "pool"), ("pool_type", "lp"), ("norm", "rmsnorm"),
    ("attention_bias", "alibi"), ("drop_path_rate", -0.1), ("drop_path_rate", 1.0), ("in_chans", 0),
    ("num_classes", -3), ("img_size", 33), ("img_size", (224, 225)), ("img_size", "224"), ("stem_stride", 3),
    ("kernel_size", 4), ("norm_eps", 0), ("expand_from", "middle"), ("se_from", "output"),
])


@settings(max_examples=40, deadline=None)
@given(bad=bad_values)
def test_every_rejected_config_raises_value_error_naming_the_field(bad):
    field, value = bad
    with pytest.raises(ValueError) as err:
        CoAtNetConfig().replace(**{field: value}).validate()
    assert re.search(rf"\b{field}\b", str(err.value)), str(err.value)


@settings(max_examples=30, deadline=None)
@given(h=st.integers(1, 400), w=st.integers(1, 400))
def test_sizes_are_accepted_exactly_when_both_sides_are_multiples_of_32(h, w):
    model = CoAtNet(CoAtNetConfig(depths=(1, 1, 1, 1, 1), widths=(8, 8, 16, 16, 16),
                                  transformer=TransformerConfig(head_dim=8), num_classes=2)).eval()
    if h % 32 == 0 and w % 32 == 0:
        assert model(torch.zeros(1, 3, h, w)).shape == (1, 2)
    else:
        with pytest.raises(ValueError, match=rf"{h}x{w} is not a multiple of 32"):
            model(torch.zeros(1, 3, h, w))
