"""Specs of `coatnet study`: the study models, the convergence rule, the plan, the verdicts of the reading, the
resumable campaign (in this process and in parallel processes), --plan and --time-limit."""
from __future__ import annotations

import json
import math

import pytest

from coatnet.cli import main
from coatnet.models import build_on_meta, count_params, get_config
from coatnet.study import LAYOUT_MODELS, get_study, plan, write_report
from coatnet.study.definitions import BASE_MODEL, STUDIES, Recipe
from coatnet.study.report import at_train_loss, compare_chain, equal_loss_accuracy, aggregate, parse_chain, seed_sd
from coatnet.study.runner import ROW_FIELDS, RunOptions, loss_change_last20, model_config_dict, row_command

NEEDS_FMNIST = pytest.mark.skipif(not __import__("pathlib").Path("/usr/share/datasets/fashion-mnist").is_dir(),
                                  reason="no Fashion-MNIST")


def _params(overrides: dict) -> int:
    return count_params(build_on_meta(get_config(BASE_MODEL, **overrides, img_size=32, in_chans=1, num_classes=10)))


def test_layout_models_are_within_ten_percent_of_the_main_jobs_model():
    counts = {name: _params(ov) for name, ov in LAYOUT_MODELS.items()}
    assert set(counts) == {"C-C-C-C", "C-C-C-T", "C-C-T-T", "C-T-T-T", "ViT-Rel"}
    assert counts["C-C-T-T"] == _params({}) == 484_114  # C-C-T-T is coatnet_micro, the main job's model
    for name, n in counts.items():
        assert abs(n / counts["C-C-T-T"] - 1) <= 0.10, (name, n)


def test_layout_models_are_the_named_layouts_at_sensible_resolutions():
    for name, ov in LAYOUT_MODELS.items():
        cfg = get_config(BASE_MODEL, **ov, img_size=32, in_chans=1, num_classes=10)
        assert cfg.layout == name
        specs = cfg.stage_specs()
        if name == "ViT-Rel":
            assert [32 // s.reduction for s in specs] == [4]  # 8x8 patches: a 4x4 token grid
        else:
            # coatnet_micro's strides: S1 8x8, S2..S4 4x4, so attention never sees a single token
            assert [32 // s.reduction for s in specs] == [8, 4, 4, 4]
            assert "".join(s.block for s in specs) == name.replace("-", "")


def test_the_convergence_rule_gives_small_sets_as_many_steps_as_8000_images():
    r = Recipe()
    assert [r.images(n) for n in (1_000, 4_000, 15_000, 60_000)] == [80_000, 80_000, 150_000, 600_000]
    assert r.steps(1_000) == r.steps(8_000) == 10 * 32 and r.steps(60_000) == 10 * 235
    # the last 20% of the steps: the last two of ten equal epochs, compared tenth against tenth
    assert loss_change_last20([1.0] * 8 + [0.5, 0.45]) == pytest.approx(-0.1)
    assert loss_change_last20([2.0, 1.0]) == pytest.approx(-0.5) and loss_change_last20([1.0]) is None
    assert loss_change_last20([5.0] * 16 + [1.0, 1.0, 0.9, 0.9]) == pytest.approx(-0.1)  # 20 epochs: pairs


def test_a_cpu_rows_device_names_its_vector_instructions(monkeypatch):
    """Two "AMD EPYC" machines differ (AVX2 only, or AVX512-BF16), and so do their rows' speeds: the device name
    says which kind measured a row; a CPU without bf16 instructions is not said to have them."""
    import torch
    from coatnet.layers import bf16_cpu
    from coatnet.study.runner import device_name

    name = device_name("cpu")
    assert name.endswith(f"; {bf16_cpu.cpu_features()})") and torch.backends.cpu.get_cpu_capability() in name
    assert ("BF16" in name or "AMX" in name) == bf16_cpu.cpu_has_native_bf16()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert bf16_cpu.cpu_features() == "AVX512, AVX512-BF16"


def test_plan_counts_and_order():
    layouts = plan(get_study("layouts"))
    assert len(layouts) == 5 * 4 * 3 - 5  # every layout at 4 sizes with 3 seeds, but 2 at 60,000 (the CPU budget)
    assert not [r for r in layouts if r.train_size == 60_000 and r.seed == 2]
    assert [r.seed for r in layouts[:20]] == [0] * 20 and {r.seed for r in layouts[20:40]} == {1}
    assert [r.train_size for r in layouts[:20:5]] == [1_000, 4_000, 15_000, 60_000]
    assert len(plan(get_study("attention"))) == 3 * 2 * 2
    assert len(plan(get_study("norms"))) == 2 * 2 * 2
    # fewer seeds at a size where the budget demands it
    every = get_study("layouts").replace(seeds_at=())
    assert len(plan(every)) == 60
    assert len({r.key for r in layouts}) == len(layouts)
    explicit = plan(get_study("norms"), seeds=(3, 4), sizes=(500,), variants=("layernorm",))
    assert [(r.variant.name, r.train_size, r.seed) for r in explicit] == [("layernorm", 500, 3), ("layernorm", 500, 4)]
    with pytest.raises(ValueError, match="train size"):
        plan(get_study("norms"), sizes=(0,))
    with pytest.raises(ValueError, match="no variant 'bn'"):
        plan(get_study("norms"), variants=("bn",))


def test_identical_runs_share_a_key_across_studies():
    # The attention study's "relative" and the norms study's "batchnorm" are the layouts study's C-C-T-T
    # (coatnet_micro has BatchNorm in its Transformer blocks): same resolved config, one run.
    key = {s: {(r.variant.name, r.train_size, r.seed): r.key for r in plan(STUDIES[s])} for s in STUDIES}
    assert key["attention"][("relative", 4000, 0)] == key["layouts"][("C-C-T-T", 4000, 0)]
    assert key["norms"][("batchnorm", 60000, 1)] == key["layouts"][("C-C-T-T", 60000, 1)]
    assert key["norms"][("layernorm", 4000, 0)] != key["layouts"][("C-C-T-T", 4000, 0)]
    assert key["attention"][("relative", 4000, 1)] != key["attention"][("relative", 4000, 0)]
    recipe = STUDIES["norms"].recipe
    assert model_config_dict(STUDIES["norms"].variant("layernorm").overrides, recipe)["transformer"]["norm"] == \
        "layernorm"


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


def test_test_accuracy_at_a_training_loss_is_read_off_the_curve_in_size_order():
    curve = [(0.1, 80.0), (0.2, 86.0), (0.3, 90.0), (0.25, 93.0)]  # losses of 1k, 4k, 15k, 60k
    assert at_train_loss(curve, 0.1) == 80.0
    # between 0.1 and 0.2, linear in log loss: halfway in log at sqrt(0.02)
    assert at_train_loss(curve, math.sqrt(0.02)) == pytest.approx(83.0)
    assert at_train_loss(curve, 0.26) == pytest.approx(86.0 + 4.0 * math.log(1.3) / math.log(1.5))  # first crossing
    assert at_train_loss(curve, 0.05) is None and at_train_loss(curve, 0.4) is None


def _row(variant, size, seed, test, train=99.0, loss=0.1):
    return {"study": "layouts", "variant": variant, "layout": variant, "train_size": size, "seed": seed,
            "params": 480_000, "train_loss": loss, "train_top1": train, "test_top1": test, "gap_top1": train - test,
            "loss_change_last20": -0.01, "seconds": 10.0, "test_images": 10_000, "run_key": f"{variant}{size}{seed}",
            "recipe_id": "x", "recipe": {**Recipe().__dict__}, "machine": "test machine", "device": "cpu",
            "device_name": "test CPU", "precision": "fp32", "parallel": 1, "steps": 320, "epochs_seen": 80.0}


def test_seed_sd_is_pooled_over_repeated_groups():
    rows = [_row("A", 100, 0, 80.0), _row("A", 100, 1, 82.0), _row("B", 100, 0, 70.0), _row("B", 100, 1, 70.0),
            _row("C", 100, 0, 60.0)]
    sd, _ = seed_sd(rows, "test_top1", 100)
    assert math.isclose(sd, math.sqrt((2.0 + 0.0) / 2))  # variances 2 and 0, C has one seed


def test_report_reads_rows_against_the_paper(tmp_path):
    study = get_study("layouts")
    vals = {"C-C-C-C": 86.0, "C-C-C-T": 85.8, "C-C-T-T": 85.0, "C-T-T-T": 84.0, "ViT-Rel": 78.0}
    keys = {(r.variant.name, r.train_size, r.seed): r.key for r in plan(study)}
    rows = [_row(v, 1000, s, x + 0.3 * s, loss=0.1 + 0.01 * i) for s in (0, 1) for i, (v, x) in enumerate(vals.items())]
    rows += [_row(v, 4000, 0, x + 2, loss=0.2 + 0.01 * i) for i, (v, x) in enumerate(vals.items())]
    rows += [_row(v, 60000, 0, x + 5, loss=0.3 - 0.01 * i) for i, (v, x) in enumerate(vals.items())]
    for r in rows:
        r["run_key"] = keys[(r["variant"], r["train_size"], r["seed"])]
    rows[0]["loss_change_last20"] = -0.05  # one row that has not converged
    md = write_report(study, rows, tmp_path, "coatnet study layouts", plan(study)).read_text()
    assert "| C-C-C-C | 1,000 | 0.480M | 0,1 | 80 | 320 |" in md
    assert "Incomplete:** 20 of 55 planned rows" in md
    assert "Converged: 19 of 20 rows (largest |change| 5.0%); not: C-C-C-C n=1,000 seed 0." in md
    assert "best first: C-C-C-C (86.15), C-C-C-T (85.95), C-C-T-T (85.15)" in md  # the orderings are printed
    assert "| C-C-C-C ~ C-C-C-T | +0.2 pt |" in md and "agrees (within noise)" in md
    assert "20 rows on test CPU" in md and "more than one device" not in md
    assert "### Capacity" in md and "final training loss at n=60,000" in md
    assert (tmp_path / "layouts.png").stat().st_size > 1000
    # equal-loss reading: at C-C-T-T's loss of n=1,000 (0.12), C-C-C-C's curve (0.10 at 1k, 0.20 at 4k) is read
    # between its sizes; the largest size is not a reference (it has more steps)
    table = equal_loss_accuracy(aggregate(rows), study.variant_names)
    assert [size for size, _, _ in table] == [1000, 4000]
    size, loss, accs = table[0]
    assert loss == pytest.approx(0.12)
    t = math.log(0.12 / 0.1) / math.log(0.2 / 0.1)
    assert accs["C-C-C-C"] == pytest.approx(86.15 + t * (88.0 - 86.15))
    rows.append({**rows[-1], "device_name": "another GPU", "device": "cuda", "run_key": "other"})
    md = write_report(study, rows, tmp_path, "coatnet study layouts", plan(study)).read_text()
    assert "more than one device" in md  # a table never mixes devices without saying so


@pytest.mark.slow
@NEEDS_FMNIST
def test_quick_study_writes_rows_and_resumes(tmp_path, capsys):
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
        assert 0 <= r["train_top1"] <= 100 and 0 <= r["test_top1"] <= 100 and r["train_loss"] > 0
        assert math.isclose(r["gap_top1"], r["train_top1"] - r["test_top1"])
        # train metrics on a sample of the row's own images: all of them when fewer than the sample size
        assert r["train_eval_images"] == min(r["train_size"], quick.recipe.train_eval_images)
        assert r["steps"] == quick.recipe.steps(r["train_size"]) and r["images_seen"] == r["steps"] * 32
        assert r["test_images"] == quick.recipe.val_subset
        assert len(r["train_loss_epochs"]) == quick.recipe.epochs and r["loss_change_last20"] is not None
        assert r["device"] == "cpu" and r["precision"] == "fp32" and r["seconds"] > 0
        assert r["command"] == (f"coatnet study norms --variants {r['variant']} --sizes {r['train_size']} --seeds 0 "
                                f"--device cpu --out {out}")
    md = (out / "norms.md").read_text()
    assert "coatnet study norms --quick" in md and "All 4 planned rows finished" in md
    assert (out / "norms.png").is_file() and json.loads((out / "norms.speed.json").read_text())[0]["variants"]
    capsys.readouterr()
    # resumable: a second run trains nothing and keeps the rows
    assert main(["study", "norms", "--quick", "--out", str(out)]) == 0
    assert "0 row(s) to train" in capsys.readouterr().out
    assert json.loads((out / "norms.json").read_text()) == rows
    # a row's recorded command trains it again: the same numbers
    again = tmp_path / "again"
    r = rows[0]
    assert main(["study", "norms", "--quick", "--variants", r["variant"], "--sizes", str(r["train_size"]),
                 "--seeds", "0", "--out", str(again), "--no-report"]) == 0
    (rerun,) = json.loads((again / "norms.json").read_text())
    assert rerun["run_key"] == r["run_key"] and rerun["test_top1"] == pytest.approx(r["test_top1"], abs=1e-6)


@pytest.mark.slow
@NEEDS_FMNIST
def test_parallel_rows_in_their_own_processes_equal_rows_run_here(tmp_path, capsys):
    """Two rows at a time, each in a spawned process: the same rows as one after another in this process; a
    row planned by two studies (norms' batchnorm is C-C-T-T) is trained once and recorded in both."""
    args = ["--quick", "--sizes", "64", "--threads", "1", "--no-report"]
    assert main(["study", "norms", "layouts", "--variants", "C-C-T-T", "batchnorm", *args, "--out",
                 str(tmp_path / "here")]) == 0
    assert main(["study", "norms", "layouts", "--variants", "C-C-T-T", "batchnorm", *args, "--parallel", "2",
                 "--out", str(tmp_path / "par")]) == 0
    out = capsys.readouterr().out
    assert out.count("started") == 1  # one run for both studies
    for study in ("norms", "layouts"):
        here, par = (json.loads((tmp_path / d / f"{study}.json").read_text()) for d in ("here", "par"))
        assert len(here) == len(par) == 1
        assert par[0]["test_top1"] == pytest.approx(here[0]["test_top1"], abs=1e-6)
        assert par[0]["train_loss"] == pytest.approx(here[0]["train_loss"], rel=1e-5)
        assert par[0]["parallel"] == 2 and here[0]["parallel"] == 1
    assert json.loads((tmp_path / "par" / "layouts.json").read_text())[0]["reused_from"] == "norms"


@pytest.mark.parametrize("out,named", [(None, "runs/study-rerun"), ("docs/results", "runs/study-rerun"),
                                       ("docs/results/cpu", "runs/study-rerun"), ("/tmp/x", "/tmp/x")])
def test_a_rows_command_never_names_the_folder_it_is_recorded_in(out, named):
    """Re-running a recorded row's command must train it, not skip it as already recorded there."""
    spec = plan(get_study("norms"))[0]
    command = row_command("norms", spec, RunOptions(out=out, parallel=2))
    assert command == (f"coatnet study norms --variants {spec.variant.name} --sizes {spec.train_size} "
                       f"--seeds {spec.seed} --device cpu --out {named}")


@NEEDS_FMNIST
def test_time_limit_and_plan(tmp_path, capsys):
    assert main(["study", "attention", "--quick", "--time-limit", "0", "--out", str(tmp_path), "--no-report"]) == 0
    assert "row(s) not run (time limit)" in capsys.readouterr().out
    assert not (tmp_path / "attention.json").exists()  # nothing trained, nothing written
    assert main(["study", "norms", "--quick", "--plan", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert sum(line.endswith("  to run") for line in out.splitlines()) == 4
    assert "total" in out and "training img/s measured here" in out


@NEEDS_FMNIST
def test_a_parallel_plan_times_the_rows_side_by_side(tmp_path, capsys):
    """With --parallel 2 on the CPU the speed is measured with two timing processes at once, and the plan's
    wall time is the rows' summed seconds over 2."""
    assert main(["study", "norms", "--quick", "--plan", "--parallel", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "training img/s measured here (each of 2 rows timed at once)" in out
    row_seconds = [float(line.split()[5]) for line in out.splitlines() if line.endswith("  to run")]
    total = next(line for line in out.splitlines() if line.startswith("total "))
    assert "2 rows at a time (timed side by side" in total
    assert float(total.split()[1]) == pytest.approx(sum(row_seconds) / 2 / 3600, abs=0.006)


def test_cli_rejects_bad_arguments(capsys):
    assert main(["study", "norms", "--quick", "--sizes", "0", "--report-only"]) == 1
    assert "error: train size 0" in capsys.readouterr().err
    assert main(["study", "norms", "--variants", "bn"]) == 1
    assert "unknown variant(s) bn" in capsys.readouterr().err
    assert main(["study", "norms", "--parallel", "0"]) == 1
    assert "--parallel 0" in capsys.readouterr().err
    assert main(["study", "nonsense"]) == 2  # argparse's error, as one line
    assert capsys.readouterr().err.startswith("error: argument study: invalid choice: 'nonsense'")
