"""The paper's variants: parameter and multiply-add counts held to the paper's tables
(tests/fixtures/paper_tables.json)."""
import json
from pathlib import Path

import pytest

import coatnet
from coatnet.models import build_on_meta, count_macs, count_params, get_config

TABLES = Path(__file__).resolve().parent / "fixtures" / "paper_tables.json"  # its "source" says where from
PAPER = json.loads(TABLES.read_text())["models"]


@pytest.mark.parametrize("name", [f"coatnet_{i}" for i in range(8)])
def test_parameter_count_matches_the_paper(name):
    params = count_params(build_on_meta(get_config(name))) / 1e6
    paper = PAPER[name]["params_M"]
    # NOTE: CoAtNet-6's published 1.47B cannot be reached by the published depths and widths under any
    # expansion rule that also reproduces CoAtNet-0..5 and -7 (we get 1.34B, as do other
    # reimplementations); it is held to 10% and documented in README "Fidelity".
    tolerance = 0.10 if name == "coatnet_6" else 0.03
    assert abs(params - paper) / paper < tolerance, (params, paper)


@pytest.mark.parametrize("name", [f"coatnet_{i}" for i in range(4)])
def test_multiply_adds_at_224_match_the_paper(name):
    macs = count_macs(build_on_meta(get_config(name))) / 1e9
    paper = PAPER[name]["gmacs"]["224"]
    assert abs(macs - paper) / paper < 0.05, (macs, paper)


def test_multiply_adds_at_384_match_the_paper():
    macs = count_macs(build_on_meta(get_config("coatnet_0", img_size=384))) / 1e9
    assert abs(macs - PAPER["coatnet_0"]["gmacs"]["384"]) / PAPER["coatnet_0"]["gmacs"]["384"] < 0.05


@pytest.mark.parametrize("name", ["coatnet_0", "coatnet_1", "coatnet_2"])
def test_stride_in_the_1x1_conv_is_cheaper_than_in_the_depthwise_conv(name):
    conv1x1 = count_macs(build_on_meta(get_config(name, downsample="conv1x1")))
    dwconv = count_macs(build_on_meta(get_config(name, downsample="dwconv")))
    assert dwconv > conv1x1 * 1.03
    paper = json.loads(TABLES.read_text())["stride2_dconv_variant_gmacs_224"][name]
    assert abs(dwconv / 1e9 - paper) / paper < 0.05, (dwconv / 1e9, paper)


def test_coatnet_6_splits_stage_3_into_mbconv_then_transformer_blocks():
    specs = get_config("coatnet_6").stage_specs()
    assert [(s.block, s.depth, s.width, s.stride) for s in specs] == [
        ("C", 2, 192, 2), ("C", 4, 384, 2), ("C", 8, 768, 2), ("T", 42, 1536, 1), ("T", 2, 2048, 2)]


def test_unknown_model_name_lists_the_available_ones():
    with pytest.raises(ValueError, match="coatnet_0.*coatnet_7"):
        coatnet.create_model("coatnet_9")


def test_none_overrides_are_ignored():
    assert get_config("coatnet_0", num_classes=None, head_dim=None) == get_config("coatnet_0")


def test_flat_and_dotted_overrides_reach_nested_fields():
    assert get_config("coatnet_0", head_dim=64).transformer.head_dim == 64
    assert get_config("coatnet_0", **{"mbconv.downsample": "dwconv"}).mbconv.downsample == "dwconv"
    with pytest.raises(ValueError, match="unknown config field 'colour'"):
        get_config("coatnet_0", colour="red")


def test_list_models_holds_the_paper_family_and_a_small_preset():
    names = coatnet.list_models()
    assert {f"coatnet_{i}" for i in range(8)} <= set(names) and "coatnet_pico" in names
