"""The network: shapes, layouts, sizes, gradients, errors, inference preparation."""
import copy
import math

import pytest
import torch

import coatnet
from coatnet.models import CoAtNetConfig
from coatnet.layers import RelativeAttention2d
from coatnet.train.redundant import freeze_redundant_parameters

SMALL = dict(depths=(1, 1, 1, 2, 1), widths=(16, 16, 32, 64, 128), head_dim=16)
LAYOUTS = ["C-C-C-C", "C-C-C-T", "C-C-T-T", "C-T-T-T"]


def small(**kw):
    return coatnet.create_model("coatnet_pico", **{**SMALL, "num_classes": 5, **kw})


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("size", [(64, 64), (32, 96)])
def test_every_layout_gives_finite_logits_for_square_and_non_square_inputs(layout, size):
    model = small(layout=layout).eval()
    out = model(torch.randn(2, 3, *size))
    assert out.shape == (2, 5) and torch.isfinite(out).all()


def test_vit_rel_is_a_patch_stem_and_one_attention_stage():
    model = coatnet.create_model("coatnet_pico", layout="ViT-Rel", depths=(3,), widths=(64,), head_dim=16,
                                 num_classes=4)
    assert model.stem.proj.kernel_size == (16, 16)
    assert len(model.stages) == 1 and len(model.stages[0].blocks) == 3
    assert model(torch.randn(2, 3, 64, 48)).shape == (2, 4)


def test_one_channel_input():
    model = small(in_chans=1).eval()
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 5)


def test_384_input_to_a_224_model():
    model = coatnet.create_model("coatnet_pico", **SMALL, num_classes=3).eval()
    assert model(torch.randn(1, 3, 384, 384)).shape == (1, 3)


def test_wrong_size_names_the_size_and_the_nearest_valid_ones():
    with pytest.raises(ValueError, match=r"100x64 is not a multiple of 32; nearest valid sizes: 96x64 or 128x64"):
        small()(torch.randn(1, 3, 100, 64))


def test_wrong_channel_count_names_both_counts():
    with pytest.raises(ValueError, match="expected 3 input channels, got 1"):
        small()(torch.randn(1, 1, 64, 64))


@pytest.mark.parametrize("field, value", [
    ("layout", "C-C-X-T"), ("head_dim", 0), ("pool_type", "median"), ("downsample", "conv3x3"),
    ("attention_bias", "absolute"), ("norm", "groupnorm"), ("drop_path_rate", 1.5), ("img_size", 100),
    ("depths", (2, 2, 3)), ("widths", (64, 96, 0, 384, 768)), ("in_chans", 0), ("num_classes", -1),
    ("expand_ratio", -4), ("se_ratio", -0.25),
])
def test_a_bad_config_value_names_its_field(field, value):
    with pytest.raises(ValueError, match=field.split(".")[-1]):
        coatnet.create_model("coatnet_0", **{field: value})


def test_head_dim_must_divide_the_transformer_widths():
    with pytest.raises(ValueError, match="head_dim=40 does not divide the Transformer width 384"):
        coatnet.create_model("coatnet_0", head_dim=40)


def test_every_parameter_receives_a_gradient():
    model = small(layout="C-C-T-T", drop_path_rate=0.1, attention_bias="relative").train()
    model(torch.randn(4, 3, 64, 64)).logsumexp(1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_drop_path_is_the_identity_in_eval_and_random_in_training():
    model = small(drop_path_rate=0.5)
    x = torch.randn(4, 3, 64, 64)
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    model.train()
    a, b = model(x), model(x)
    assert not torch.allclose(a, b)


def test_drop_path_rises_linearly_over_blocks():
    model = small(drop_path_rate=0.3)
    # one rate per block: MBConv blocks hold one DropPath, Transformer blocks two with the same rate
    per_block = [b.drop_path.rate if hasattr(b, "drop_path") else b.drop_path1.rate
                 for stage in model.stages for b in stage.blocks]
    assert per_block == pytest.approx([0.3 * i / (len(per_block) - 1) for i in range(len(per_block))])


def test_set_input_size_and_back_restores_the_outputs():
    model = small().eval()
    x = torch.randn(2, 3, 64, 64)
    before = model(x)
    model.set_input_size((128, 96))
    assert model.config.image_size == (128, 96)
    tables = [p for n, p in model.named_parameters() if n.endswith("relative_bias_table")]
    assert tables[0].shape[-2:] == (2 * 128 // 16 - 1, 2 * 96 // 16 - 1)  # first T stage is S3 (stride 16)
    model.set_input_size(64)
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def test_a_state_dict_from_another_resolution_loads_with_resized_tables():
    src = small(img_size=64)
    dst = small(img_size=128)
    dst.load_state_dict(src.state_dict())
    src.set_input_size(128)
    x = torch.randn(1, 3, 128, 128)
    torch.testing.assert_close(dst.eval()(x), src.eval()(x))


def test_forward_intermediates_returns_strides_2_to_32():
    model = small().eval()
    x = torch.randn(1, 3, 64, 96)
    maps = model.forward_intermediates(x)
    assert [tuple(m.shape[-2:]) for m in maps] == [(32, 48), (16, 24), (8, 12), (4, 6), (2, 3)]
    assert [m.shape[1] for m in maps] == list(SMALL["widths"])
    torch.testing.assert_close(maps[-1], model.forward_features(x))


def test_forward_is_head_of_features():
    model = small().eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(model(x), model.forward_head(model.forward_features(x)))
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 128)


def test_reset_classifier_changes_the_class_count():
    model = small()
    model.reset_classifier(7)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 128)


def test_no_weight_decay_holds_tables_norms_and_biases_only():
    model = small()
    names = model.no_weight_decay()
    params = dict(model.named_parameters())
    assert any(n.endswith("relative_bias_table") for n in names)
    assert all(params[n].ndim <= 1 or n.endswith("relative_bias_table") for n in names)
    assert "head.weight" not in names and "head.bias" in names
    assert all(n in names for n, p in params.items() if p.ndim == 1)


def test_grad_checkpointing_gives_the_same_gradients():
    x = torch.randn(2, 3, 64, 64)
    a = small().train()
    b = small().train()
    b.load_state_dict(a.state_dict())
    b.set_grad_checkpointing(True)
    a(x).sum().backward()
    b(x).sum().backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("downsample", ["conv1x1", "dwconv"])
def test_inference_model_matches_the_eval_model(layout, downsample):
    model = small(layout=layout, downsample=downsample)
    # Non-trivial BatchNorm statistics so that folding is really exercised.
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 64, 64) * 2 + 1)
    model.eval()
    fast = coatnet.inference_model(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) and not isinstance(m, type(model.norm))
                   for m in fast.modules() if type(m) is torch.nn.BatchNorm2d)
    x = torch.randn(3, 3, 64, 96)
    ref = model(x)
    out = fast(x)
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_config_round_trips_through_a_dict():
    cfg = coatnet.get_config("coatnet_6", img_size=(384, 512))
    assert CoAtNetConfig.from_dict(cfg.to_dict()) == cfg


def test_batchnorm_transformer_blocks_train_on_a_single_image_at_1x1():
    # coatnet_nano's last stage sees a 1x1 map at 32 px: a last batch of one image must not crash.
    model = coatnet.create_model("coatnet_nano", num_classes=3).train()
    before = model.norm.running_mean.clone()
    out = model(torch.randn(1, 3, 32, 32))
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.equal(model.norm.running_mean, before)


@pytest.mark.parametrize("name, drop_path", [("coatnet_nano", 0.0), ("coatnet_nano", 0.5), ("coatnet_nano_ln", 0.0)])
def test_frozen_redundant_parameters_are_exactly_those_with_zero_gradient(name, drop_path):
    # In float64 a gradient that is zero in exact arithmetic is ~1e-17 of the others; AdamW would still turn
    # it into lr-sized steps, so training freezes these (and the key and value parts of qkv.bias behind a
    # redundant output bias). Everything left trainable must have a real gradient.
    torch.manual_seed(0)
    model = coatnet.create_model(name, num_classes=10, in_chans=1, drop_path_rate=drop_path).double().train()
    plain = copy.deepcopy(model)  # as built: every gradient measured
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    frozen = freeze_redundant_parameters(model)
    if name == "coatnet_nano_ln":
        assert frozen == sorted(n for n in frozen if n.endswith("pre_norm.bias"))  # only the MBConv ones
    else:  # the 1-token last stage's norm bias and its output biases
        assert "stages.3.blocks.0.norm1.bias" in frozen or drop_path > 0
        assert ("stages.3.blocks.0.attn.proj.bias" in frozen) == (drop_path == 0)
    attns = {n: m for n, m in model.named_modules() if isinstance(m, RelativeAttention2d)}
    torch.manual_seed(1)
    x = torch.randn(16, 1, 32, 32, dtype=torch.float64)
    plain(x).logsumexp(-1).sum().backward()
    grads = {n: p.grad for n, p in plain.named_parameters()}
    scale = max(float(g.abs().max()) for g in grads.values())
    for n in frozen:
        assert grads[n].abs().max() < 1e-12 * scale, n
    for n, g in grads.items():
        if n in frozen:
            continue
        if n.endswith("attn.qkv.bias"):
            attn = attns[n[:-len(".qkv.bias")]]
            q, k, v = g.chunk(3)
            assert k.abs().max() < 1e-12 * scale, n  # the softmax ignores the key bias
            assert (v.abs().max() < 1e-12 * scale) == attn.qkv.freeze_value, n
            if math.prod(attn.feature_size) == 1:
                assert q.abs().max() == 0  # one token: the softmax is exactly 1
            continue
        if n.endswith("relative_bias_table") and math.prod(attns[n.rsplit(".", 2)[0]].feature_size) == 1:
            assert g.abs().max() == 0
            continue
        assert g.abs().max() > 1e-9 * scale, n  # a real gradient
    # The frozen model: those roundoff gradients are exactly zero, or no gradient at all.
    model(x).logsumexp(-1).sum().backward()
    params = dict(model.named_parameters())
    assert all(params[n].grad is None for n in frozen)
    for n, attn in attns.items():
        q, k, v = attn.qkv.bias.grad.chunk(3)
        assert k.abs().max() == 0 and (v.abs().max() == 0) == attn.qkv.freeze_value, n
    assert all(torch.equal(p, reference[n]) for n, p in model.named_parameters())  # values are kept


def test_the_parity_swap_keeps_the_parameters_their_names_and_the_outputs():
    from coatnet.train.redundant import QkvWithFrozenBias

    torch.manual_seed(0)
    model = coatnet.create_model("coatnet_nano", num_classes=10).eval()
    with torch.no_grad():  # a key bias that matters numerically (ours start at zero, timm's do not)
        for m in model.modules():
            if isinstance(m, RelativeAttention2d):
                m.qkv.bias.normal_()
    params, keys = dict(model.named_parameters()), list(model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    expected = model(x)
    freeze_redundant_parameters(model)
    qkvs = [m.qkv for m in model.modules() if isinstance(m, RelativeAttention2d)]
    assert qkvs and all(type(q) is QkvWithFrozenBias for q in qkvs)
    assert all(p is params[n] for n, p in model.named_parameters())  # an optimizer made before keeps working
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_the_parity_swap_takes_the_bf16_cpu_kernels_where_the_linear_it_replaces_would(monkeypatch):
    from coatnet.layers import bf16_cpu
    from coatnet.train.redundant import QkvWithFrozenBias

    monkeypatch.setattr(bf16_cpu, "emulated_bf16_cpu", lambda: True)
    calls = []
    apply = bf16_cpu._LinearBf16.apply
    monkeypatch.setattr(bf16_cpu._LinearBf16, "apply", lambda *a: calls.append(1) or apply(*a))
    qkv = bf16_cpu.Linear(16, 48)
    x = torch.randn(2, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = qkv(x)
        got = QkvWithFrozenBias(qkv, freeze_value=True)(x)
    assert calls == [1, 1]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
