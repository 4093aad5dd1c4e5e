"""Relative attention: the paper's formula, the index, the table resize, fused == reference."""
import pytest
import torch

from coatnet.layers import RelativeAttention2d, gather_bias, relative_position_index, resize_bias_table


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
        attn.relative_bias_table.copy_(torch.arange(3 * 5, dtype=torch.float).reshape(1, 3, 5) / 10)
    x = torch.randn(1, h, w, d)
    tokens = x.reshape(h * w, d)
    expected = torch.empty_like(tokens)
    for i in range(h * w):
        logits = torch.stack([
            tokens[i] @ tokens[j] / d**0.5
            + attn.relative_bias_table[0, (i // w - j // w) + h - 1, (i % w - j % w) + w - 1]
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
    assert torch.equal(resize_bias_table(table, (7, 5)), table)
    resized = resize_bias_table(table, (14, 10))
    assert resized.shape == (4, 27, 19)


def test_a_constant_table_stays_constant_when_resized():
    table = torch.full((2, 13, 13), 0.7)
    torch.testing.assert_close(resize_bias_table(table, (12, 12)), torch.full((2, 23, 23), 0.7))


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
    torch.testing.assert_close(big.relative_bias_table, resize_bias_table(small.relative_bias_table, (8, 8)))


@pytest.mark.parametrize("mlp_width", [0, 16])
def test_the_position_bias_plug_in_keeps_the_checkpoint_names(mlp_width):
    attn = RelativeAttention2d(32, 32, 16, (4, 4), mlp_width=mlp_width).eval()
    bias_names = (["relative_position_mlp.fc1.weight", "relative_position_mlp.fc1.bias",
                   "relative_position_mlp.fc2.weight", "relative_position_mlp.fc2.bias"] if mlp_width else [])
    expected = (["relative_bias_table"] * (not mlp_width) + ["qkv.weight", "qkv.bias", "proj.weight", "proj.bias"]
                + bias_names)
    assert list(attn.state_dict()) == expected
    assert [n for n, _ in attn.named_parameters()] == expected
    other = RelativeAttention2d(32, 32, 16, (4, 4), mlp_width=mlp_width).eval()
    other.load_state_dict(attn.state_dict())  # strict: nothing missing, nothing unexpected
    torch.testing.assert_close(other.bias((3, 5)), attn.bias((3, 5)))
    assert attn.bias((3, 5)).shape == (2, 15, 15)


def test_set_feature_size_and_back_restores_the_table_exactly():
    attn = RelativeAttention2d(32, 32, 16, (4, 4))
    table = attn.relative_bias_table.detach().clone()
    attn.set_feature_size((6, 3))
    assert attn.relative_bias_table.shape == (2, 11, 5)
    assert attn.relative_bias_table is attn.position_bias.relative_bias_table  # one table, resized in place
    attn.set_feature_size((4, 4))
    assert torch.equal(attn.relative_bias_table, table)
