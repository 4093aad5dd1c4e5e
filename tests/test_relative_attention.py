"""Relative attention: the paper's formula, the index, the table resize, fused == reference."""
import pytest
import torch

from coatnet.layers import RelativeAttention2d, gather_bias, relative_position_index, resize_table
from coatnet.layers.relative_attention import reference_attention
from coatnet.models.weights import upgrade_state_dict


def test_index_maps_each_offset_to_its_own_entry():
    h, w = 3, 4
    index = relative_position_index(h, w)
    coords = [(i // w, i % w) for i in range(h * w)]
    seen = {}
    for i, (yi, xi) in enumerate(coords):
        for j, (yj, xj) in enumerate(coords):
            seen.setdefault((yi - yj, xi - xj), set()).add(int(index[i, j]))
    assert all(len(v) == 1 for v in seen.values())  # an offset always reads the same entry
    assert len({next(iter(v)) for v in seen.values()}) == (2 * h - 1) * (2 * w - 1)  # offsets never share
    assert index.min() == 0 and index.max() == (2 * h - 1) * (2 * w - 1) - 1


def test_bias_depends_only_on_offset():
    table = torch.randn(2, 2 * 4 - 1, 2 * 5 - 1)
    bias = gather_bias(table, (4, 5))  # (heads, N, N)
    # positions (0,0)->(1,2) and (2,1)->(3,3) share the offset (-1,-2)
    assert torch.equal(bias[:, 0 * 5 + 0, 1 * 5 + 2], bias[:, 2 * 5 + 1, 3 * 5 + 3])
    assert torch.equal(bias[:, 0, 0], table[:, 3, 4])  # offset (0, 0) is the table's centre


def test_matches_the_papers_formula_on_a_hand_built_example():
    # One head, head_dim = width, identity projections: y_i = sum_j softmax_j(x_i.x_j / sqrt(d) + w[i-j]) x_j
    h, w, d = 2, 3, 4
    attn = RelativeAttention2d(d, d, head_dim=d, feature_size=(h, w))
    with torch.no_grad():
        attn.qkv.weight.copy_(torch.cat([torch.eye(d)] * 3))
        attn.qkv.bias.zero_()
        attn.proj.weight.copy_(torch.eye(d))
        attn.proj.bias.zero_()
        attn.position_bias.relative_bias_table.copy_(torch.arange(3 * 5, dtype=torch.float).reshape(1, 3, 5) / 10)
    x = torch.randn(1, h, w, d)
    tokens = x.reshape(h * w, d)
    expected = torch.empty_like(tokens)
    for i in range(h * w):
        logits = torch.stack([
            tokens[i] @ tokens[j] / d**0.5
            + attn.position_bias.relative_bias_table[0, (i // w - j // w) + h - 1, (i % w - j % w) + w - 1]
            for j in range(h * w)
        ])
        expected[i] = (logits.softmax(0)[:, None] * tokens).sum(0)
    out = attn(x).reshape(h * w, d)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["relative", "none"])
def test_fused_and_reference_paths_agree(mode):
    attn = RelativeAttention2d(64, 64, head_dim=16, feature_size=(4, 6), bias_mode=mode)
    x = torch.randn(3, 4, 6, 64)
    torch.testing.assert_close(attn(x), attn(x, reference=True), rtol=1e-5, atol=1e-5)


def test_post_softmax_bias_differs_from_pre_softmax():
    pre = RelativeAttention2d(32, 32, 16, (4, 4), "relative")
    post = RelativeAttention2d(32, 32, 16, (4, 4), "relative_post")
    post.load_state_dict(pre.state_dict())
    x = torch.randn(2, 4, 4, 32)
    assert not torch.allclose(pre(x), post(x), atol=1e-4)


def test_resizing_a_table_to_its_own_size_is_the_identity():
    table = torch.randn(4, 13, 9)
    assert torch.equal(resize_table(table, (7, 5)), table)
    resized = resize_table(table, (14, 10))
    assert resized.shape == (4, 27, 19)


def test_a_constant_table_stays_constant_when_resized():
    table = torch.full((2, 13, 13), 0.7)
    torch.testing.assert_close(resize_table(table, (12, 12)), torch.full((2, 23, 23), 0.7))


def test_other_input_sizes_use_a_resized_table():
    attn = RelativeAttention2d(32, 32, 16, (4, 4))
    x = torch.randn(1, 8, 6, 32)
    out = attn(x)
    attn.set_feature_size((8, 6))
    torch.testing.assert_close(out, attn(x))


def test_loading_a_table_of_another_size_resizes_it():
    small = RelativeAttention2d(32, 32, 16, (4, 4))
    big = RelativeAttention2d(32, 32, 16, (8, 8))
    big.load_state_dict(small.state_dict())
    torch.testing.assert_close(big.position_bias.relative_bias_table,
                               resize_table(small.position_bias.relative_bias_table, (8, 8)))


@pytest.mark.parametrize("mlp_width", [0, 16])
def test_the_position_bias_plug_in_holds_its_parameters_first(mlp_width):
    attn = RelativeAttention2d(32, 32, 16, (4, 4), mlp_width=mlp_width).eval()
    bias_names = (["position_bias.fc1.weight", "position_bias.fc1.bias", "position_bias.fc2.weight",
                   "position_bias.fc2.bias"] if mlp_width else ["position_bias.relative_bias_table"])
    expected = bias_names + ["qkv.weight", "qkv.bias", "proj.weight", "proj.bias"]
    assert list(attn.state_dict()) == expected  # the index is a buffer, but not part of the state
    assert [n for n, _ in attn.named_parameters()] == expected
    other = RelativeAttention2d(32, 32, 16, (4, 4), mlp_width=mlp_width).eval()
    other.load_state_dict(attn.state_dict())  # strict: nothing missing, nothing unexpected
    torch.testing.assert_close(other.bias((3, 5)), attn.bias((3, 5)))
    assert attn.bias((3, 5)).shape == (2, 15, 15)


@pytest.mark.parametrize("mlp_width", [0, 16])
def test_state_dicts_with_the_keys_of_earlier_versions_load(mlp_width):
    # Before the plug-in slot the attention held `relative_bias_table` and `relative_position_mlp.*` itself.
    attn = RelativeAttention2d(32, 32, 16, (4, 4), mlp_width=mlp_width).eval()
    old = {k.replace("position_bias.relative_bias_table", "relative_bias_table")
           .replace("position_bias.", "relative_position_mlp."): v for k, v in attn.state_dict().items()}
    assert not any("position_bias" in k for k in old)
    other = RelativeAttention2d(32, 32, 16, (4, 4), mlp_width=mlp_width).eval()
    other.load_state_dict(upgrade_state_dict(old))
    torch.testing.assert_close(other.bias((4, 4)), attn.bias((4, 4)), rtol=0, atol=0)
    assert upgrade_state_dict({"stages.2.blocks.0.attn.relative_bias_table": 0}) == {
        "stages.2.blocks.0.attn.position_bias.relative_bias_table": 0}
    assert upgrade_state_dict(attn.state_dict()).keys() == attn.state_dict().keys()  # current keys stay


def test_the_index_and_the_table_before_a_resize_are_buffers_that_follow_the_size_and_the_device():
    attn = RelativeAttention2d(32, 32, 16, (4, 4))
    table = attn.position_bias
    assert torch.equal(table.relative_position_index, relative_position_index(4, 4))
    attn.set_feature_size((3, 5))
    assert torch.equal(table.relative_position_index, relative_position_index(3, 5))
    attn.to("meta")  # what a resize keeps for its round trip follows too
    assert table.relative_position_index.device.type == table.table_before_resize.device.type == "meta"


def test_the_own_size_reads_the_index_buffer_without_rebuilding_it(monkeypatch):
    attn = RelativeAttention2d(32, 32, 16, (4, 4))
    x = torch.randn(2, 4, 4, 32)
    expected = attn(x)
    table = attn.position_bias.relative_bias_table.detach()
    with torch.no_grad():  # a buffer that is really read: scrambling it changes the output
        attn.position_bias.relative_position_index.copy_(relative_position_index(4, 4).flip(0))
    assert not torch.allclose(attn(x), expected)
    attn.position_bias.relative_position_index = relative_position_index(4, 4)

    def no_rebuild(*args, **kwargs):
        raise AssertionError("relative_position_index rebuilt in forward")

    monkeypatch.setattr("coatnet.layers.position_bias.relative_position_index", no_rebuild)
    torch.testing.assert_close(attn(x), expected, rtol=0, atol=0)
    assert torch.equal(attn.position_bias.relative_bias_table, table)


def test_set_feature_size_and_back_restores_the_table_exactly():
    attn = RelativeAttention2d(32, 32, 16, (4, 4))
    param = attn.position_bias.relative_bias_table
    table = param.detach().clone()
    attn.set_feature_size((6, 3))
    assert param.shape == (2, 11, 5)
    assert attn.position_bias.relative_bias_table is param  # one table, resized in place
    attn.set_feature_size((4, 4))
    assert torch.equal(param, table)


def test_a_table_changed_after_a_resize_is_resized_again_not_restored():
    attn = RelativeAttention2d(32, 32, 16, (4, 4))
    param = attn.position_bias.relative_bias_table
    attn.set_feature_size((6, 3))
    with torch.no_grad():
        param.add_(1.0)  # a training step at 6 x 3
    changed = param.detach().clone()
    attn.set_feature_size((4, 4))
    torch.testing.assert_close(param.detach(), resize_table(changed, (4, 4)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_fused_attention_on_one_token_gives_q_k_and_the_bias_exactly_zero_gradient(dtype):
    # The softmax over one key is exactly 1, so nothing but v can reach the output. torch's fused kernel
    # gives exact zeros there, as the reference path does: no separate path for one-token maps is needed
    # (the last stage at 32 px; train/redundant.py relies on these zeros for N-process parity).
    torch.manual_seed(0)
    q, k, v = (torch.randn(16, 8, 1, 32, dtype=dtype, requires_grad=True) for _ in range(3))
    bias = torch.randn(8, 1, 1, dtype=dtype, requires_grad=True)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0))
    (out * torch.randn_like(out)).sum().backward()
    assert q.grad.abs().max() == 0 and k.grad.abs().max() == 0 and bias.grad.abs().max() == 0
    assert v.grad.abs().max() > 0
    torch.testing.assert_close(out, reference_attention(q, k, v, bias), rtol=0, atol=0)


def test_an_empty_batch_gives_the_bias_a_zero_gradient():
    # The fused kernel would give it none: a process left without samples must still reduce one.
    attn = RelativeAttention2d(32, 32, 16, (4, 4))
    attn(torch.randn(0, 4, 4, 32)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in attn.parameters())


def test_a_learned_bias_in_bf16_on_a_cpu_takes_the_written_out_equation(monkeypatch):
    """Training in bf16 on a CPU (the bias needs a gradient): torch's dispatcher would run its unfused math kernel,
    slower than eq. 3 written out, so the layer computes eq. 3 itself; without a gradient (inference) or in fp32
    it calls the fused kernel. Both give the fused kernel's output to bf16's precision."""
    import torch.nn.functional as F

    from coatnet.layers import relative_attention as ra

    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(ra.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    layer = ra.RelativeAttention2d(32, 32, head_dim=8, feature_size=(4, 4))
    with torch.no_grad():
        layer.position_bias.relative_bias_table.normal_()
    x = torch.randn(2, 4, 4, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        trained = layer(x)
    assert calls == []  # bf16, bias with a gradient: eq. 3 written out
    trained.float().sum().backward()
    assert layer.position_bias.relative_bias_table.grad.abs().sum() > 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fused = layer(x)
    assert calls == [1]  # no gradient: the fused kernel
    torch.testing.assert_close(trained.float(), fused.float(), rtol=0.05, atol=0.05)
    layer(x)  # fp32 with a gradient: the fused kernel (within 15% of the written-out form there either way)
    assert calls == [1, 1]
