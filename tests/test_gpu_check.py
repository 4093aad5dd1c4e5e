"""scripts/gpu_check.py, the prepared GPU check, on the CPU: its arguments, its JSON and markdown, the CPU
fallback of each part in the tiny configuration, and that a part's failure or timeout is recorded while the
next part still runs."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import coatnet

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
SRC = str(Path(__file__).resolve().parents[1] / "src")
_spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)


def tiny(*extra: str, tmp_path: Path | None = None):
    args = gpu_check.parse_args(["--tiny", *extra])
    args.work = str(tmp_path) if tmp_path is not None else None
    return args


# -- arguments -----------------------------------------------------------------------------------------------
def test_defaults_are_the_issues_configuration():
    args = gpu_check.parse_args([])
    assert args.parts == list(gpu_check.PARTS) and args.budget == 450
    assert (args.model, args.img_size, args.train_batch) == ("coatnet_0", 224, 128) and not args.no_timm
    # every part's limit fits the budget alone, and the parts together are cut by the budget, not the limits
    assert all(0 < limit <= args.budget for limit in args.limits.values())


def test_tiny_is_the_cpu_configuration():
    args = tiny("--limit", "onnx=7")
    assert (args.model, args.img_size, args.train_batch, args.infer_batch) == ("coatnet_nano", 32, 2, 2)
    assert args.no_timm and args.limits["onnx"] == 7.0 and args.limits["env"] == gpu_check.LIMITS["env"]


@pytest.mark.parametrize("argv", [["--parts", "env,warp"], ["--limit", "warp=3"], ["--limit", "onnx=soon"],
                                  ["--budget", "0"]])
def test_bad_arguments_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as e:
        gpu_check.parse_args(argv)
    assert e.value.code == 2 and ": error: " in capsys.readouterr().err.strip().splitlines()[-1]


# -- the report ----------------------------------------------------------------------------------------------
def _report() -> dict:
    speed = {"step": "train", "batch": 128, "models": {"coatnet_0": {"images_per_s": 2400.0},
                                                       "timm:coatnet_0_224": {"images_per_s": 1600.0}},
             "ratios": {"coatnet_0_224": 1.5}, "goals": {"coatnet_0_224": {"ratio": 1.5, "goal": 1.2, "met": True}}}
    infer = {**speed, "step": "inference", "models": {"coatnet_0": {"images_per_s": 9000.0}}, "ratios": {}}
    infer.pop("goals")
    return {"started": "2026-12-02 00:00:00 UTC", "budget_s": 450, "parts": {
        "env": {"status": "ok", "seconds": 3.0, "result": {"gpu": "NVIDIA H100", "torch": "2.11", "capability": "9.0"}},
        "parity": {"status": "ok", "seconds": 9.0, "result": {
            "fp32": {"rel_error": 2e-7, "tolerance": 1e-5, "pass": True},
            "bf16": {"rel_error": 4e-3, "tolerance": 1e-3, "pass": False}}},
        "speed_eager": {"status": "ok", "seconds": 30.0, "result": {"train": speed, "inference": infer}},
        "onnx": {"status": "failed", "seconds": 2.0, "error": "ValueError: no | onnx"},
        "train_main": {"status": "timeout", "seconds": 200.0, "result": {
            "epochs_done": 3, "val_top1": 88.5, "val_top5": 99.0, "img_per_s_mean": 5000.0, "cut_short": True}},
        "compiled_train": {"status": "skipped", "seconds": 0, "error": "out of budget"}}}


def test_report_is_one_json_and_a_markdown_table(tmp_path):
    gpu_check.write_report(tmp_path, _report())
    assert json.loads((tmp_path / "gpu_check.json").read_text()) == _report()
    md = (tmp_path / "gpu_check.md").read_text()
    assert "device: NVIDIA H100" in md
    assert "| parity | ok | 9.0 | fp32 2.0e-07 (< 1e-05: True), bf16 4.0e-03 (< 0.001: False) |" in md
    assert "| speed_eager | ok | 30.0 | coatnet_0_224 x1.50; goals coatnet_0_224 >= 1.2: True |" in md
    assert "| onnx | failed | 2.0 | ValueError: no / onnx |" in md  # a pipe would break the table
    assert "3 epochs (cut short by its limit): val top-1 88.50%, 5000 img/s" in md
    assert "| compiled_train | skipped | 0 | out of budget |" in md
    assert "| coatnet_0 | 2400 | - | 9000 | - |" in md and "| timm:coatnet_0_224 | 1600 | - | - | - |" in md


# -- the parts on the CPU ------------------------------------------------------------------------------------
def test_env_reports_the_device_plan(tmp_path):
    info = gpu_check.part_env(tiny(tmp_path=tmp_path))
    assert info["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert info["plan"]["dist_backend"] == ("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")


def test_sync_debug_runs_twenty_training_steps_and_says_what_needs_cuda(tmp_path):
    res = gpu_check.part_sync_debug(tiny(tmp_path=tmp_path))
    assert res["steps"] == 20 and res["syncs"] == {}
    if not torch.cuda.is_available():
        assert "skipped on cpu" in res["note"] and res["pass"] is False  # unwatched steps prove nothing
        assert gpu_check._note("sync_debug", {"status": "ok", "result": res}) == res["note"]


def test_pipeline_sets_the_jpeg_folder_against_batches_already_on_the_device(tmp_path):
    res = gpu_check.part_pipeline(tiny(tmp_path=tmp_path))
    rates = res["img_per_s"]
    assert set(rates) == {"jpeg_folder", "on_device"} and all(r > 0 for r in rates.values())
    assert res["ratio"] == pytest.approx(rates["jpeg_folder"] / rates["on_device"]) and res["goal"] == 0.9
    assert res["met"] == (res["ratio"] >= 0.9) and res["steps_per_epoch"] == 4
    assert "JPEG folder" in gpu_check._note("pipeline", {"status": "ok", "result": res})


def test_parity_measures_both_precisions(tmp_path):
    res = gpu_check.part_parity(tiny(tmp_path=tmp_path))
    assert res["fp32"]["pass"] and res["fp32"]["rel_error"] < 1e-5
    assert 0 < res["bf16"]["rel_error"] < 0.1  # measured, and bf16 (not a copy of the fp32 numbers)


def test_speed_interleaves_ours_with_timms_models(tmp_path, monkeypatch):
    made = []

    def stand_in(name, num_classes):  # timm is not needed here: any module with the right outputs times alike
        made.append(name)
        return coatnet.create_model("coatnet_nano", num_classes=num_classes, img_size=32)

    monkeypatch.setattr(gpu_check, "timm_factory", stand_in)
    args = tiny(tmp_path=tmp_path)
    args.no_timm = False
    res = gpu_check._speed(args, train=True, compile=False)
    assert made == list(gpu_check.TIMM_MODELS)
    assert list(res["models"]) == ["coatnet_nano", "coatnet_nano:dwconv", "timm:coatnet_0_rw_224",
                                   "timm:coatnet_0_224"]
    assert all(m["images_per_s"] > 0 for m in res["models"].values())
    # timm's paper-style model against our dwconv form (the same architecture), its own against our default
    assert res["compared"] == {"coatnet_0_rw_224": "coatnet_nano", "coatnet_0_224": "coatnet_nano:dwconv"}
    speed = {k: m["images_per_s"] for k, m in res["models"].items()}
    assert res["ratios"]["coatnet_0_224"] == pytest.approx(speed["coatnet_nano:dwconv"] / speed["timm:coatnet_0_224"])
    assert res["ratios"]["coatnet_0_rw_224"] == pytest.approx(speed["coatnet_nano"] / speed["timm:coatnet_0_rw_224"])
    assert set(res["goals"]) == {"coatnet_0_224", "coatnet_0_rw_224"} and res["goals"]["coatnet_0_224"]["goal"] == 1.2


def test_speed_without_timm_times_ours_and_says_why(tmp_path, monkeypatch):
    def missing(name, num_classes):
        raise ValueError("--compare-timm needs timm, which is not importable here")

    monkeypatch.setattr(gpu_check, "timm_factory", missing)
    args = tiny(tmp_path=tmp_path)
    args.no_timm = False
    res = gpu_check._speed(args, train=False, compile=False)
    assert list(res["models"]) == ["coatnet_nano", "coatnet_nano:dwconv"] and res["ratios"] == {}
    assert res["skipped"]["timm:coatnet_0_224"].startswith("ValueError: --compare-timm needs timm")


def test_onnx_export_from_the_device_model(tmp_path):
    pytest.importorskip("onnxruntime")
    res = gpu_check.part_onnx(tiny(tmp_path=tmp_path))
    assert res["pass"] and res["rel_error_vs_device_model"] < 1e-4 and res["bytes"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the failure of a part that needs a missing GPU")
def test_a_failing_part_writes_its_error(tmp_path):
    result = tmp_path / "env.json"
    code = gpu_check.main(["--part", "env", "--result", str(result), "--work", str(tmp_path), "--device", "cuda"])
    assert code == 1 and "CUDA is not available" in json.loads(result.read_text())["error"]


@pytest.mark.slow
def test_a_part_past_its_limit_is_recorded_and_the_next_one_runs(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--out", str(tmp_path), "--parts", "parity,env",
                           "--limit", "parity=0.5"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["parts"]["parity"]["status"] == "timeout" and report["parts"]["parity"]["seconds"] < 30
    assert report["parts"]["env"]["status"] == "ok" and report["parts"]["env"]["result"]["plan"]
    assert {p.name for p in tmp_path.iterdir()} == {"gpu_check.json", "gpu_check.md", "gpu_check.log"}


@pytest.mark.slow
@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="no Fashion-MNIST")
def test_main_job_reports_accuracy_and_speed(tmp_path):
    res = gpu_check.part_train_main(tiny(tmp_path=tmp_path))
    assert res["epochs_done"] == 1 and 0 <= res["val_top1"] <= 100 and res["img_per_s_mean"] > 0
    assert "--precision bf16" in res["command"] and res["final"]["precision"] == "bf16"
