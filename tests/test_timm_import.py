"""timm's CoAtNet checkpoints: fixtures reproduced, key mapping, resizing, refusals (never needs timm).

The fixtures (tests/fixtures/timm/, timm_fixtures.py) hold timm's outputs for weights made from a seed; the
tests make the weights again and write them as a timm checkpoint file."""
import logging

import pytest
import torch
from safetensors.torch import save_file

import coatnet
from coatnet.layers import resize_table
from coatnet.models.timm_import import convert_timm_state_dict, is_timm_state_dict, timm_key_to_ours
from coatnet.models.timm_variants import TIMM_VARIANTS
from timm_fixtures import NAMES as FIXTURES
from timm_fixtures import load as load_fixture
from timm_fixtures import weights_hash


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    """Each fixture (timm_fixtures.load), its weights also written as a timm checkpoint file at "path"."""
    root = tmp_path_factory.mktemp("timm")
    out = {}
    for name in FIXTURES:
        out[name] = {**load_fixture(name), "path": str(root / f"{name}.safetensors")}
        save_file(out[name]["weights"], out[name]["path"])
    return out


@pytest.mark.parametrize("name", FIXTURES)
def test_the_weights_made_from_the_seed_are_those_timm_was_given(name, fixtures):
    meta = fixtures[name]["meta"]
    assert weights_hash(fixtures[name]["weights"]) == meta["weights_sha256"], (
        "the seeded weights changed: regenerate the fixtures with scripts/timm_fixtures.py")
    assert list(fixtures[name]["x"].shape) == meta["input_shape"] and fixtures[name]["logits"].shape == (1, 1000)


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_logits_and_features_match_timm(name, fixtures):
    data = fixtures[name]
    model = coatnet.create_model(name, pretrained=data["path"]).eval()
    assert sum(p.numel() for p in model.parameters()) == data["meta"]["num_params"]
    with torch.no_grad():
        features = model.forward_features(data["x"])
        logits = model.forward_head(features)
        fast = coatnet.inference_model(model)(data["x"])
    assert rel_err(features, data["features"]) < 1e-4
    assert rel_err(logits, data["logits"]) < 1e-4
    assert rel_err(fast, data["logits"]) < 1e-4


def test_a_224_rmlp_checkpoint_loads_into_a_384_model_without_a_table_to_resize(fixtures, tmp_path):
    name = "coatnet_rmlp_nano_rw_224"
    model = coatnet.create_model(name, img_size=384, pretrained=fixtures[name]["path"]).eval()
    assert not any(n.endswith("relative_bias_table") for n, _ in model.named_parameters())
    x = torch.nn.functional.interpolate(fixtures[name]["x"][:1], size=384, mode="bilinear")
    ref224 = coatnet.create_model(name, pretrained=fixtures[name]["path"]).eval()
    with torch.no_grad():
        # The MLP holds no per-size state: a 384 model and a 224 model given 384 inputs agree exactly.
        torch.testing.assert_close(model(x), ref224(x), rtol=1e-5, atol=1e-5)


def test_a_224_table_checkpoint_loads_into_a_384_model_with_tables_resized(fixtures):
    name = "coatnet_nano_rw_224"
    model = coatnet.create_model(name, img_size=384, pretrained=fixtures[name]["path"])
    tables = {n: p for n, p in model.named_parameters() if n.endswith("relative_bias_table")}
    assert tables["stages.2.blocks.1.attn.position_bias.relative_bias_table"].shape[-2:] == (47, 47)  # 24x24 map
    src = fixtures[name]["weights"]["stages.2.blocks.1.attn.rel_pos.relative_position_bias_table"]  # (27*27, heads)
    expected = resize_table(src.T.reshape(-1, 27, 27), (24, 24), "geometric")
    torch.testing.assert_close(tables["stages.2.blocks.1.attn.position_bias.relative_bias_table"].data, expected)
    assert torch.isfinite(model.eval()(torch.randn(1, 3, 384, 384))).all()


def test_a_different_class_count_drops_the_head_with_a_message(fixtures, caplog):
    caplog.set_level(logging.INFO, logger="coatnet")
    name = "coatnet_nano_rw_224"
    model = coatnet.create_model(name, num_classes=10, pretrained=fixtures[name]["path"])
    assert "classifier for 1000 classes dropped" in caplog.text
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_a_checkpoint_missing_weights_is_refused(fixtures, tmp_path):
    state = {k: v for k, v in fixtures["coatnet_nano_rw_224"]["weights"].items() if "stages.3.blocks.2" not in k}
    save_file(state, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match=r"missing \(e\.g\. stages\.3\.blocks\.2\."):
        coatnet.create_model("coatnet_nano_rw_224", pretrained=str(tmp_path / "partial.safetensors"))


def test_a_checkpoint_of_another_variant_is_refused(fixtures, tmp_path):
    with pytest.raises(ValueError, match="does not fit this architecture"):
        coatnet.create_model("coatnet_rmlp_nano_rw_224", pretrained=fixtures["coatnet_nano_rw_224"]["path"])


def test_a_pth_checkpoint_is_read_without_unpickling_code(fixtures, tmp_path):
    torch.save({"state_dict": fixtures["coatnet_nano_rw_224"]["weights"]}, tmp_path / "timm.pth")
    model = coatnet.create_model("coatnet_nano_rw_224", pretrained=str(tmp_path / "timm.pth")).eval()
    with torch.no_grad():
        assert rel_err(model(fixtures["coatnet_nano_rw_224"]["x"]), fixtures["coatnet_nano_rw_224"]["logits"]) < 1e-4


def test_key_mapping():
    assert timm_key_to_ours("stem.conv2.weight") == "stem.layers.3.weight"
    assert timm_key_to_ours("stages.1.blocks.0.se_early.fc1.bias") == "stages.1.blocks.0.se.fc1.bias"
    assert timm_key_to_ours("stages.2.blocks.0.norm1.norm.weight") == "stages.2.blocks.0.norm1.weight"
    assert timm_key_to_ours("stages.2.blocks.1.attn.rel_pos.mlp.fc2.weight") == \
        "stages.2.blocks.1.attn.position_bias.fc2.weight"
    assert timm_key_to_ours("head.pre_logits.fc.bias") == "pre_logits.fc.bias"
    assert timm_key_to_ours("head.fc.weight") == "head.weight"


def test_qkv_rows_are_regrouped_from_per_head_to_per_projection():
    model = coatnet.create_model("coatnet_pico_rw_224", num_classes=0)
    heads = model.stages[2].blocks[1].attn.num_heads
    dim = model.stages[2].blocks[1].attn.qkv.in_features
    rows = torch.arange(3 * dim, dtype=torch.float)  # timm order: head h, then q/k/v, then channel
    state = {"stem.conv1.weight": torch.zeros(1), "stages.2.blocks.1.attn.qkv.bias": rows}
    ours = convert_timm_state_dict(state, model)["stages.2.blocks.1.attn.qkv.bias"]
    d = dim // heads
    # our row (s, h, i) holds timm's row (h, s, i)
    assert ours[1 * dim + 2 * d + 3] == rows[2 * 3 * d + 1 * d + 3]
    assert is_timm_state_dict(state) and not is_timm_state_dict(model.state_dict())


def test_geometric_resize_spreads_source_entries_and_holds_the_ends():
    table = torch.tensor([[[1.0, 2.0, 3.0]]]).expand(1, 3, 3) * torch.tensor([1.0, 10.0, 100.0])[None, :, None]
    out = resize_table(table, (3, 3), "geometric")  # 3 -> 5 entries per axis
    # one source step (n=1) can only reach offset 1: targets -2..2 read v0, v0, v1, v2, v2
    torch.testing.assert_close(out[0, 2], torch.tensor([10.0, 10.0, 20.0, 30.0, 30.0]))
    torch.testing.assert_close(out[0, :, 2], torch.tensor([2.0, 2.0, 20.0, 200.0, 200.0]))
    assert torch.equal(resize_table(table, (2, 2), "geometric"), table)


def test_every_timm_name_is_registered_and_builds_on_meta():
    from coatnet.models import build_on_meta, count_params, get_config

    assert len(TIMM_VARIANTS) == 21 and set(TIMM_VARIANTS) <= set(coatnet.list_models())
    # parameter counts published in timm's results table (millions)
    published = {"coatnet_0_rw_224": 27.44, "coatnet_1_rw_224": 41.72, "coatnet_2_rw_224": 73.87,
                 "coatnet_rmlp_1_rw_224": 41.69, "coatnet_rmlp_2_rw_384": 73.88, "coatnet_nano_rw_224": 15.14,
                 "coatnet_rmlp_nano_rw_224": 15.15, "coatnet_bn_0_rw_224": 27.44, "coatnet_nano_cc_224": 13.76}
    for name, millions in published.items():
        assert round(count_params(build_on_meta(get_config(name))) / 1e6, 2) == millions, name


def test_timms_mixed_stages_map_onto_our_split_stages():
    """timm's coatnet_nano_cc_224 keeps stage 3 (one MBConv block, then five Transformer blocks) as one
    stage, stages.2.blocks.0..5; we build it as two, stages.2.blocks.0 and stages.3.blocks.0..4."""
    from coatnet.models.timm_import import convert_timm_state_dict

    model = coatnet.create_model("coatnet_nano_cc_224")
    ours = model.state_dict()
    timm_numbering = {2: (2, 0), 3: (2, 1), 4: (3, 0), 5: (3, 1)}  # our stage -> (timm stage, block offset)

    def to_timm(key):
        if not key.startswith("stages."):
            return key
        _, i, _, j, rest = key.split(".", 4)
        stage, offset = timm_numbering.get(int(i), (int(i), 0))
        return f"stages.{stage}.blocks.{int(j) + offset}.{rest}"

    timm_state = {to_timm(k): v for k, v in ours.items()}
    assert "stages.2.blocks.5.attn.qkv.weight" in timm_state and "stages.3.blocks.2.mlp.fc2.bias" in timm_state
    converted = convert_timm_state_dict(timm_state, model)
    assert converted.keys() == ours.keys()
    for k in ("stages.2.blocks.0.conv2.weight", "stages.3.blocks.4.mlp.fc1.weight", "stages.5.blocks.1.norm1.weight"):
        assert converted[k] is ours[k], k


def test_a_featureless_model_drops_the_checkpoints_classifier(fixtures, caplog):
    caplog.set_level(logging.INFO, logger="coatnet")
    name = "coatnet_nano_rw_224"
    model = coatnet.create_model(name, num_classes=0, pretrained=fixtures[name]["path"]).eval()
    assert "classifier dropped; the model has none" in caplog.text
    with torch.no_grad():
        pooled = model(fixtures[name]["x"])
    torch.testing.assert_close(pooled, fixtures[name]["features"].mean((2, 3)), rtol=1e-4, atol=1e-4)


def test_without_a_class_count_the_model_takes_the_checkpoints(fixtures, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="coatnet")
    state = dict(fixtures["coatnet_nano_rw_224"]["weights"])
    state["head.fc.weight"], state["head.fc.bias"] = state["head.fc.weight"][:7], state["head.fc.bias"][:7]
    save_file(state, str(tmp_path / "seven.safetensors"))
    model = coatnet.create_model("coatnet_nano_rw_224", pretrained=str(tmp_path / "seven.safetensors"))
    assert model.num_classes == 7 and "dropped" not in caplog.text
    torch.testing.assert_close(model.head.weight, state["head.fc.weight"].float())


def test_weights_stored_under_model_beside_other_tensors_load(fixtures, tmp_path, caplog):
    # The layout of parity files that keep the weights with their input and outputs (model.*, x, logits).
    caplog.set_level(logging.INFO, logger="coatnet")
    data = fixtures["coatnet_nano_rw_224"]
    save_file({**{f"model.{k}": v for k, v in data["weights"].items()}, "x": data["x"], "logits": data["logits"]},
              str(tmp_path / "with_io.safetensors"))
    model = coatnet.create_model("coatnet_nano_rw_224", pretrained=str(tmp_path / "with_io.safetensors")).eval()
    assert "ignoring 2 others (logits, x)" in caplog.text
    with torch.no_grad():
        assert rel_err(model(data["x"]), data["logits"]) < 1e-4
