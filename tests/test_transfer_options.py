"""Config options that express timm's CoAtNet variants: structure, validation, inference folding."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import coatnet

SMALL = dict(depths=(2, 1, 1, 2, 1), widths=(16, 16, 32, 64, 128), head_dim=16, num_classes=5)
TIMM_LIKE = {
    "mbconv.activation": "silu", "mbconv.pre_norm_act": True, "mbconv.downsample": "pool",
    "mbconv.se_placement": "before_norm", "mbconv.se_activation": "relu", "mbconv.se_from": "expanded",
    "mbconv.expand_from": "input", "mbconv.shortcut_bias": False, "mbconv.project_bias": False,
    "transformer.widen_in": "proj", "transformer.shortcut_bias": False, "transformer.layer_scale": 0.5,
    "stem_hidden_width": 8, "shortcut_projection": "width_change",
}


def small(**kw):
    return coatnet.create_model("coatnet_pico", **{**SMALL, **kw})


def warmed(model):
    """Non-trivial BatchNorm statistics so that folding is really exercised."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 64, 64) * 2 + 1)
    return model.eval()


@pytest.mark.parametrize("extra", [
    {}, {"pool_type": "max3x3"}, {"transformer.relative_bias": "mlp", "transformer.relative_mlp_width": 32},
    {"transformer.norm": "batchnorm", "head_hidden": 24}, {"mbconv.pre_norm_act": False, "head_hidden": 24},
    {"mbconv.se_placement": "after_norm", "mbconv.downsample": "dwconv", "transformer.table_resize": "geometric"},
])
def test_inference_model_matches_the_eval_model_with_timm_options(extra):
    model = warmed(small(**{**TIMM_LIKE, **extra}))
    fast = coatnet.inference_model(model)
    x = torch.randn(3, 3, 64, 96)
    ref = model(x)
    assert (fast(x) - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_every_parameter_receives_a_gradient_with_timm_options():
    model = small(**TIMM_LIKE, **{"transformer.relative_bias": "mlp", "head_hidden": 24}).train()
    model(torch.randn(4, 3, 64, 64)).logsumexp(1).sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0] == []


def test_widening_in_the_projection_keeps_qkv_at_the_input_width():
    paper, timm_rw = small(), small(**{"transformer.widen_in": "proj"})
    assert paper.stages[2].blocks[0].attn.qkv.out_features == 3 * 64  # widened in qkv: output width
    assert timm_rw.stages[2].blocks[0].attn.qkv.out_features == 3 * 32  # input width; proj widens
    assert timm_rw.stages[2].blocks[0].attn.proj.out_features == 64


def test_shortcut_projection_rule_and_biases():
    # S1 keeps the stem's width (16 -> 16) while downsampling
    assert small().stages[0].blocks[0].shortcut is not None  # paper: projected on every strided block
    model = small(shortcut_projection="width_change", **{"mbconv.shortcut_bias": False})
    assert model.stages[0].blocks[0].shortcut is None
    assert model.stages[1].blocks[0].shortcut.bias is None


def test_stem_hidden_width_and_activation():
    model = small(stem_hidden_width=8, **{"mbconv.activation": "silu"})
    layers = list(model.stem.layers)
    assert layers[0].out_channels == 8 and layers[-1].out_channels == 16
    assert isinstance(layers[2], torch.nn.SiLU)


def test_layer_scale_starts_at_its_value_and_scales_both_branches():
    model = small(**{"transformer.layer_scale": 1e-6}).eval()
    block = model.stages[2].blocks[1]
    assert torch.equal(block.ls1.gamma, torch.full((64,), 1e-6)) and block.ls2.gamma.shape == (64,)
    x = torch.randn(1, 4, 4, 64)
    torch.testing.assert_close(block(x), x, atol=1e-4, rtol=0)  # branches nearly off at 1e-6


def test_pre_logits_head_norms_after_pooling():
    model = small(head_hidden=24).eval()
    assert isinstance(model.norm, torch.nn.Identity)
    feats = model.forward_features(torch.randn(2, 3, 64, 64))
    pre = model.forward_head(feats, pre_logits=True)
    assert pre.shape == (2, 24) and pre.abs().max() <= 1  # tanh
    expected = model.pre_logits(model.head_norm(feats.mean((2, 3))))
    torch.testing.assert_close(pre, expected)
    model.reset_classifier(7)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)


def test_mlp_relative_bias_has_no_table_and_follows_any_size():
    model = small(**{"transformer.relative_bias": "mlp", "transformer.relative_mlp_width": 16}).eval()
    assert not any("relative_bias_table" in n for n, _ in model.named_parameters())
    attn = model.stages[2].blocks[1].attn
    assert attn.bias((3, 5)).shape == (attn.num_heads, 15, 15)
    assert all(n in model.no_weight_decay() for n, _ in model.named_parameters() if ".position_bias." in n)
    x = torch.randn(1, 3, 128, 96)
    before = model(x)
    model.set_input_size((128, 96))
    torch.testing.assert_close(model(x), before)


@pytest.mark.parametrize("field, value", [
    ("mbconv.activation", "tanh"), ("se_placement", "middle"), ("se_from", "hidden"), ("downsample", "conv3x3"),
    ("pre_norm_act", "yes"), ("project_bias", 1), ("widen_in", "mlp"), ("relative_bias", "rope"),
    ("relative_mlp_width", 0), ("table_resize", "bicubic"), ("layer_scale", -1), ("stem_hidden_width", -8),
    ("head_hidden", 1.5), ("shortcut_projection", "never"), ("pool_type", "max3"),
])
def test_a_bad_option_names_its_field(field, value):
    with pytest.raises(ValueError, match=field.split(".")[-1]):
        coatnet.get_config("coatnet_0", **{field: value})


def test_paper_variants_keep_their_defaults():
    cfg = coatnet.get_config("coatnet_0")
    assert (cfg.mbconv.activation, cfg.mbconv.downsample, cfg.transformer.widen_in, cfg.head_hidden,
            cfg.shortcut_projection, cfg.transformer.relative_bias) == ("gelu", "conv1x1", "qkv", 0, "strided",
                                                                        "table")

option_values = st.fixed_dictionaries({
    "mbconv.activation": st.sampled_from(["gelu", "silu", "relu"]),
    "mbconv.pre_norm_act": st.booleans(),
    "mbconv.downsample": st.sampled_from(["conv1x1", "dwconv", "pool"]),
    "mbconv.se_placement": st.sampled_from(["after_norm", "before_norm"]),
    "mbconv.se_from": st.sampled_from(["input", "output", "expanded"]),
    "mbconv.shortcut_bias": st.booleans(),
    "transformer.widen_in": st.sampled_from(["qkv", "proj"]),
    "transformer.relative_bias": st.sampled_from(["table", "mlp"]),
    "transformer.norm": st.sampled_from(["layernorm", "batchnorm"]),
    "transformer.layer_scale": st.sampled_from([0.0, 0.1]),
    "pool_type": st.sampled_from(["avg", "max", "max3x3"]),
    "shortcut_projection": st.sampled_from(["strided", "width_change"]),
    "head_hidden": st.sampled_from([0, 24]),
})


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(options=option_values)
def test_any_combination_of_options_builds_runs_and_folds(options):
    model = coatnet.create_model("coatnet_pico", depths=(1, 1, 1, 1, 1), widths=(16, 16, 32, 32, 64),
                                 head_dim=16, num_classes=3, **{"transformer.relative_mlp_width": 16, **options})
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 64, 64))
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    ref = model(x)
    assert ref.shape == (2, 3) and torch.isfinite(ref).all()
    assert (coatnet.inference_model(model)(x) - ref).abs().max() <= 1e-4 * ref.abs().max()
