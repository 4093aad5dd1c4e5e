"""Specs of `coatnet study`: the study models, the plan, the verdicts of the reading, and a --quick run."""
from __future__ import annotations

import json
import math

import pytest

from coatnet.cli import main
from coatnet.models import build_on_meta, count_params, get_config
from coatnet.study import LAYOUT_MODELS, get_study, plan, write_report
from coatnet.study.definitions import BASE_MODEL, STUDIES
from coatnet.study.report import compare_chain, parse_chain, seed_sd
from coatnet.study.runner import ROW_FIELDS, model_config_dict


def _params(overrides: dict) -> int:
    return count_params(build_on_meta(get_config(BASE_MODEL, **overrides, img_size=32, in_chans=1, num_classes=10)))


def test_layout_models_have_about_equal_parameter_counts():
    counts = {name: _params(ov) for name, ov in LAYOUT_MODELS.items()}
    assert set(counts) == {"C-C-C-C", "C-C-C-T", "C-C-T-T", "C-T-T-T", "ViT-Rel"}
    assert max(counts.values()) / min(counts.values()) <= 1.10, counts
    assert all(5e5 <= n <= 8e5 for n in counts.values()), counts


def test_layout_models_are_the_named_layouts_at_sensible_resolutions():
    for name, ov in LAYOUT_MODELS.items():
        cfg = get_config(BASE_MODEL, **ov, img_size=32, in_chans=1, num_classes=10)
        assert cfg.layout == name
        specs = cfg.stage_specs()
        if name == "ViT-Rel":
            assert [s.reduction for s in specs] == [8]  # a 4x4 token grid from 32x32
        else:
            # stride-1 stem: S1..S4 at 16, 8, 4, 2 pixels; attention never sees a 1x1 map
            assert [32 // s.reduction for s in specs] == [16, 8, 4, 2]
            assert "".join(s.block for s in specs) == name.replace("-", "")


def test_plan_counts_and_order():
    layouts = plan(get_study("layouts"))
    assert len(layouts) == 5 * 3 * 2  # every layout at 3 sizes with seed 0, then all again with seed 1
    assert [r.seed for r in layouts[:15]] == [0] * 15 and {r.seed for r in layouts[15:]} == {1}
    assert [r.train_size for r in layouts[:15:5]] == [1000, 4000, 60000]
    assert len(plan(get_study("attention"))) == 3 * 2 * 2
    assert len(plan(get_study("norms"))) == 2 * 2 * 2
    # seeds beyond the first run only at the study's repeat sizes (unless sizes are named)
    few = get_study("norms").replace(repeat_sizes=(1000,))
    assert [(r.variant.name, r.train_size, r.seed) for r in plan(few)][4:] == [("layernorm", 1000, 1),
                                                                                ("batchnorm", 1000, 1)]
    assert len({r.key for r in layouts}) == len(layouts)
    explicit = plan(get_study("norms"), seeds=(3, 4), sizes=(500,))
    assert [(r.variant.name, r.train_size, r.seed) for r in explicit] == [
        ("layernorm", 500, 3), ("batchnorm", 500, 3), ("layernorm", 500, 4), ("batchnorm", 500, 4)]
    with pytest.raises(ValueError, match="train size"):
        plan(get_study("norms"), sizes=(0,))


def test_identical_runs_share_a_key_across_studies():
    # The attention study's "relative" and the norms study's "layernorm" are the layouts study's C-C-T-T:
    # same resolved config, so a row is trained once and reused.
    key = {s: {(r.variant.name, r.train_size, r.seed): r.key for r in plan(STUDIES[s])} for s in STUDIES}
    assert key["attention"][("relative", 1000, 0)] == key["layouts"][("C-C-T-T", 1000, 0)]
    assert key["norms"][("layernorm", 60000, 0)] == key["layouts"][("C-C-T-T", 60000, 0)]
    assert key["norms"][("batchnorm", 1000, 0)] != key["layouts"][("C-C-T-T", 1000, 0)]
    assert key["attention"][("relative", 1000, 1)] != key["attention"][("relative", 1000, 0)]
    recipe = STUDIES["norms"].recipe
    assert model_config_dict(STUDIES["norms"].variant("batchnorm").overrides, recipe)["transformer"]["norm"] == \
        "batchnorm"


def test_parse_chain():
    names, rels = parse_chain("C-C-C-C ~ C-C-C-T >= C-C-T-T > C-T-T-T >> ViT-Rel")
    assert names == ["C-C-C-C", "C-C-C-T", "C-C-T-T", "C-T-T-T", "ViT-Rel"]
    assert rels == ["~", ">=", ">", ">>"]
    with pytest.raises(ValueError):
        parse_chain("A > > B")


def test_compare_chain_verdicts():
    values = {"A": (90.0, 1), "B": (89.9, 1), "C": (85.0, 1), "D": (88.0, 1)}
    sd = 0.5  # noise band of a difference of two single rows: 2 * 0.5 * sqrt(2) = 1.41
    pairs = {(p["a"], p["b"]): p for p in compare_chain("A ~ B > C > D", values, sd)}
    assert math.isclose(pairs[("A", "B")]["noise"], 2 * 0.5 * math.sqrt(2))
    assert pairs[("A", "B")]["rel"] == "~" and pairs[("A", "B")]["verdict"] == "agrees (within noise)"
    assert pairs[("A", "C")]["rel"] == ">" and pairs[("A", "C")]["verdict"] == "agrees"
    assert pairs[("C", "D")]["verdict"] == "reversed"
    assert compare_chain("A ~ C", values, sd)[0]["verdict"] == "differs"
    assert math.isclose(pairs[("C", "D")]["diff"], -3.0)
    # lower is better (e.g. train loss): the sign flips
    low = {p["a"] + p["b"]: p for p in compare_chain("A > B", {"A": (0.2, 2), "B": (0.5, 2)}, 0.01, False)}
    assert low["AB"]["verdict"] == "agrees" and math.isclose(low["AB"]["diff"], 0.3)
    assert math.isclose(low["AB"]["noise"], 2 * 0.01)


def _row(variant, size, seed, val, train=99.0, loss=0.1):
    return {"study": "layouts", "variant": variant, "layout": variant, "train_size": size, "seed": seed,
            "params": 600_000, "train_loss": loss, "train_top1": train, "val_top1": val, "gap_top1": train - val,
            "seconds": 10.0, "val_images": 10_000, "run_key": f"{variant}{size}{seed}", "recipe_id": "x",
            "recipe": {"steps": 96, "lr": 1e-3, "warmup_steps": 10, "weight_decay": 0.05, "batch_size": 64,
                       "clip_grad": 1.0, "threads": 1, "val_subset": None, "train_eval_images": 1000},
            "machine": "test machine"}


def test_seed_sd_is_pooled_over_repeated_groups():
    rows = [_row("A", 100, 0, 80.0), _row("A", 100, 1, 82.0), _row("B", 100, 0, 70.0), _row("B", 100, 1, 70.0),
            _row("C", 100, 0, 60.0)]
    sd, _ = seed_sd(rows, "val_top1", 100)
    assert math.isclose(sd, math.sqrt((2.0 + 0.0) / 2))  # variances 2 and 0, C has one seed


def test_report_reads_rows_against_the_paper(tmp_path):
    study = get_study("layouts")
    vals = {"C-C-C-C": 86.0, "C-C-C-T": 85.8, "C-C-T-T": 85.0, "C-T-T-T": 84.0, "ViT-Rel": 78.0}
    keys = {(r.variant.name, r.train_size, r.seed): r.key for r in plan(study)}
    rows = [_row(v, 1000, s, x + 0.3 * s) for s in (0, 1) for v, x in vals.items()]
    rows += [_row(v, 60000, 0, x + 5, loss=0.3 - 0.01 * i) for i, (v, x) in enumerate(vals.items())]
    for r in rows:
        r["run_key"] = keys[(r["variant"], r["train_size"], r["seed"])]
    md = write_report(study, rows, tmp_path, "coatnet study layouts", plan(study)).read_text()
    assert "| C-C-C-C | 1,000 | 0.600M | 0,1 |" in md
    assert "Incomplete:** 15 of 30 planned rows" in md  # 4k rows and seed 1 at 60k missing
    assert "best first: C-C-C-C (86.15), C-C-C-T (85.95), C-C-T-T (85.15)" in md  # the orderings are printed
    assert "| C-C-C-C ~ C-C-C-T | +0.20 pt |" in md and "agrees (within noise)" in md
    assert (tmp_path / "layouts.png").stat().st_size > 1000


@pytest.mark.slow
def test_quick_study_writes_rows_and_resumes(tmp_path, capsys):
    pytest.importorskip("coatnet.train", reason="the training engine ([train]) is not merged into this tree yet")
    out = tmp_path / "results"
    assert main(["study", "norms", "--quick", "--out", str(out)]) == 0
    rows = json.loads((out / "norms.json").read_text())
    quick = get_study("norms", quick=True)
    assert len(rows) == len(quick.variants) * len(quick.train_sizes) == 4
    assert {(r["variant"], r["train_size"]) for r in rows} == {
        (v, n) for v in ("layernorm", "batchnorm") for n in quick.train_sizes}
    for r in rows:
        assert set(ROW_FIELDS) <= set(r)
        assert r["params"] == _params(quick.variant(r["variant"]).overrides)
        assert 0 <= r["train_top1"] <= 100 and 0 <= r["val_top1"] <= 100 and r["train_loss"] > 0
        assert math.isclose(r["gap_top1"], r["train_top1"] - r["val_top1"])
        # train metrics on a sample of the row's own images: all of them when fewer than the sample size
        assert r["train_eval_images"] == min(r["train_size"], quick.recipe.train_eval_images)
        assert r["steps"] == quick.recipe.steps and r["images_seen"] == quick.recipe.images
        assert r["val_images"] == quick.recipe.val_subset
        assert r["seconds"] > 0 and r["bench_train_img_s"] > 0
    md = (out / "norms.md").read_text()
    assert "coatnet study norms --quick" in md and "All 4 planned rows finished" in md
    assert (out / "norms.png").is_file()
    capsys.readouterr()
    # resumable: a second run trains nothing and keeps the rows
    assert main(["study", "norms", "--quick", "--out", str(out)]) == 0
    assert "0 to run" in capsys.readouterr().out
    assert json.loads((out / "norms.json").read_text()) == rows


def test_cli_rejects_bad_arguments(capsys):
    assert main(["study", "norms", "--quick", "--sizes", "0", "--report-only"]) == 1
    assert "error: train size 0" in capsys.readouterr().err
    assert main(["study", "layouts", "--steps", "0", "--report-only"]) == 1
    assert "error: --steps 0 must be a positive integer" in capsys.readouterr().err
    assert main(["study", "nonsense"]) == 2  # argparse's error, as one line
    assert capsys.readouterr().err.startswith("error: argument study: invalid choice: 'nonsense'")
