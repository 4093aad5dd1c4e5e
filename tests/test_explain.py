"""`coatnet explain` / coatnet.explain: Grad-CAM, per-head attention of a query and the learned relative-position
bias, each checked against a case computed by hand, then the PNG files for real checkpoints."""
import json

import pytest
import torch
from PIL import Image

import coatnet
from coatnet.cli import main
from coatnet.data import DataSpec
from coatnet.data.datasets import IMAGENET_MEAN, IMAGENET_STD
from coatnet.explain import (attention_maps, attention_weights, bias_by_offset, default_cam_stage, explain, grad_cam,
                             gradcam, stage_names)
from coatnet.layers import RelativeAttention2d
from coatnet.train.checkpoint import save_weights_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def test_grad_cam_of_a_hand_computed_case():
    a = torch.tensor([[[1.0, 0.0], [0.0, 2.0]],  # channel 0
                      [[0.0, 3.0], [1.0, 0.0]]])  # channel 1
    g = torch.tensor([[[1.0, 1.0], [1.0, 1.0]],  # mean 1
                      [[-2.0, 0.0], [0.0, -2.0]]])  # mean -1
    # weights (1, -1): 1*a0 - a1 = [[1, -3], [-1, 2]] -> ReLU -> [[1, 0], [0, 2]] -> / 2
    torch.testing.assert_close(grad_cam(a, g), torch.tensor([[0.5, 0.0], [0.0, 1.0]]))
    assert grad_cam(a, -g.abs()).max() == 0  # no positive evidence anywhere: all zero, not NaN


def test_grad_cam_at_the_last_stage_is_the_class_activation_map():
    """With BatchNorm before the pooled linear head (coatnet_nano), the gradient of a logit with respect to the
    last stage's map is the same at every position, so Grad-CAM there is ReLU(sum_c w_c g_c / s_c A_c), normalised
    (CAM, Zhou et al. 2016): w the head's row, g and s the norm's scale and running std."""
    model = coatnet.create_model("coatnet_nano", num_classes=3, img_size=128).eval()
    norm = model.norm
    with torch.no_grad():
        norm.running_var.uniform_(0.5, 2.0)
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(1, 3, 128, 128)
    cam, logits, stage = gradcam(model, x, class_index=2, stage="S4")
    with torch.no_grad():
        maps = model.forward_intermediates(x)
    raw = model.stages[-1](model.stages[-2](model.stages[-3](model.stages[-4](model.stem(x)))))[0]  # (C, 4, 4)
    scale = model.head.weight[2] * norm.weight / torch.sqrt(norm.running_var + norm.eps)
    expected = torch.relu(torch.einsum("c,chw->hw", scale, raw.detach()))
    assert stage == "S4" and cam.shape == (4, 4) and maps[-1].shape[-2:] == (4, 4)
    torch.testing.assert_close(cam, expected / expected.max(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits, model(x)[0].detach())


def test_the_default_cam_map_is_the_deepest_with_at_least_7_cells():
    model = coatnet.create_model("coatnet_nano")
    assert default_cam_stage(model, (32, 32)) == "S1"  # 8x8; S2 is 4x4
    assert default_cam_stage(model, (224, 224)) == "S4"  # 7x7, as Grad-CAM is usually shown
    assert default_cam_stage(model, (64, 64)) == "S2"
    with pytest.raises(ValueError, match="no feature map named 'S9'"):
        gradcam(model.eval(), torch.randn(1, 3, 32, 32), stage="S9")


@pytest.mark.parametrize("mode", ["relative", "relative_post", "none"])
def test_attention_weights_are_what_the_layer_computes(mode):
    attn = RelativeAttention2d(16, 32, 8, (3, 4), bias_mode=mode)
    x = torch.randn(2, 3, 4, 16)
    weights = attention_weights(attn, x)  # (2, heads, 12, 12)
    v = attn.qkv(x).reshape(2, 12, 3, 4, 8)[:, :, 2].transpose(1, 2)  # (B, heads, N, head_dim)
    out = attn.proj((weights @ v).transpose(1, 2).reshape(2, 3, 4, 32))
    torch.testing.assert_close(out, attn(x), rtol=1e-5, atol=1e-5)
    if mode != "relative_post":
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 12))


def test_attention_maps_sum_to_one_over_the_keys_of_each_stage():
    model = coatnet.create_model("coatnet_nano", img_size=128).eval()
    found = attention_maps(model, torch.randn(1, 3, 128, 128), query=(0.0, 0.99))
    assert set(found) == {"S3", "S4"}
    assert found["S3"]["maps"].shape == (4, 8, 8) and found["S4"]["maps"].shape == (8, 4, 4)
    assert found["S3"]["query"] == (0, 7) and found["S4"]["query"] == (0, 3)
    for f in found.values():
        torch.testing.assert_close(f["maps"].sum((1, 2)), torch.ones(len(f["maps"])))


def test_a_bias_table_with_one_entry_shows_exactly_at_that_offset():
    attn = RelativeAttention2d(16, 32, 8, (3, 4))  # 4 heads, a (4, 5, 7) table
    with torch.no_grad():
        attn.position_bias.relative_bias_table.zero_()
        # table index (H-1 + dy, W-1 + dx) holds w for query - key = (dy, dx) = (1, -2)
        attn.position_bias.relative_bias_table[2, 2 + 1, 3 - 2] = 5.0
    grid = bias_by_offset(attn)  # indexed by key - query = (-1, 2)
    assert grid.shape == (4, 5, 7)
    nonzero = grid.nonzero().tolist()
    assert nonzero == [[2, 2 - 1, 3 + 2]] and grid[2, 1, 5] == 5.0
    # and that is what the layer adds: query (1, 0) to the key at (0, 2)
    assert attn.bias((3, 4))[2, 1 * 4 + 0, 0 * 4 + 2] == 5.0


def test_bias_by_offset_reads_mlp_biases_too():
    model = coatnet.create_model("coatnet_rmlp_nano_rw_224", img_size=64).eval()  # the MLP drops out in training
    attn = next(m for m in model.modules() if isinstance(m, RelativeAttention2d))
    grid = bias_by_offset(attn)
    table = attn.position_bias.table(attn.feature_size).detach()  # indexed by query - key
    torch.testing.assert_close(grid, table.flip(-1).flip(-2))


def _checkpoint(path, layout="C-C-T-T", img_size=64):
    net = coatnet.create_model("coatnet_nano", num_classes=4, img_size=img_size, layout=layout)
    spec = DataSpec("colours", ("blue", "green", "red", "white"), 3, img_size, 1.0, IMAGENET_MEAN, IMAGENET_STD)
    save_weights_checkpoint(path, net.state_dict(), {
        "model_config": net.config.to_dict(), "data": spec.to_dict(), "epoch": 1, "step": 1, "metrics": {},
        "run": {"model": "coatnet_nano"}})
    return str(path)


def test_explain_writes_readable_pictures_per_image_and_per_model(tiny_run, colour_images, tmp_path):
    images = [colour_images / "red" / "00.png", colour_images / "blue" / "00.png"]
    out = tmp_path / "x"
    result = explain(tiny_run / "checkpoint-best.safetensors", images, out, query=(0.25, 0.75))
    assert result["notes"] == [] and sorted(p.name for p in out.iterdir()) == [
        "bias-S3.png", "bias-S4.png", "blue-00.attention-S3.png", "blue-00.attention-S4.png", "blue-00.gradcam.png",
        "red-00.attention-S3.png", "red-00.attention-S4.png", "red-00.gradcam.png"]
    first = result["images"][0]
    assert first["image"] == str(images[0]) and first["cam_stage"] == "S1" and first["target"] == first["predicted"]
    for path in out.iterdir():
        with Image.open(path) as img:
            assert img.format == "PNG" and img.size[0] >= 300 and img.size[1] >= 150
    assert sum(p.stat().st_size for p in out.iterdir()) < 1_000_000


def test_explain_for_another_class_and_a_model_without_attention(tmp_path, colour_images, capsys):
    ckpt = _checkpoint(tmp_path / "cccc.safetensors", layout="C-C-C-C")
    image = str(colour_images / "red" / "00.png")
    code = main(["explain", "--checkpoint", ckpt, image, "--out", str(tmp_path / "o"), "--class", "green", "--json"])
    out, err = capsys.readouterr()
    assert code == 0
    result = json.loads(out)
    assert result["images"][0]["target"] == "green" and result["bias"] == []
    assert "no Transformer stage (layout C-C-C-C): Grad-CAM only" in err
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["00.gradcam.png"]
    assert main(["explain", "--checkpoint", ckpt, image, "--out", str(tmp_path / "o"), "--class", "purple"]) == 1
    assert capsys.readouterr().err.startswith("error: class 'purple' is not one of the model's")


def test_explain_cli_skips_unreadable_files_and_stage_names_follow_the_layout(tmp_path, colour_images, capsys):
    ckpt = _checkpoint(tmp_path / "ctt.safetensors", layout="C-T-T-T", img_size=32)
    (tmp_path / "bad.png").write_bytes(b"nope")
    code = main(["explain", "--checkpoint", ckpt, str(colour_images / "red" / "00.png"), str(tmp_path / "bad.png"),
                 "--out", str(tmp_path / "o")])
    out, err = capsys.readouterr()
    assert code == 0 and "skipped unreadable file" in err and "bad.png" in err
    names = sorted(p.name for p in (tmp_path / "o").iterdir())
    assert names == ["00.attention-S2.png", "00.attention-S3.png", "00.attention-S4.png", "00.gradcam.png",
                     "bias-S2.png", "bias-S3.png", "bias-S4.png"]
    # timm's C-C-CT-CT nano: S3 and S4 are MBConv then Transformer blocks, both named after their stage
    assert stage_names(coatnet.create_model("coatnet_nano_cc_224")) == ["S1", "S2", "S3", "S3", "S4", "S4"]
