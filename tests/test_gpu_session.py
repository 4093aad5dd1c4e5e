"""scripts/gpu_session.sh, the prepared call for a session lent a GPU, rehearsed on the CPU with --tiny: the check's
parts, the study campaign and the long recipe's variants run, and every file the device call brings back is written
under $OUT."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="no Fashion-MNIST")]


def test_the_session_script_runs_the_check_and_the_campaign_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    # Each step ends when its tiny work is done; TOTAL_TINY only bounds a slow machine (an AVX2-only CPU with bf16
    # forced, emulated, took 235 s, and at 300 s left the device check too little).
    env = {**os.environ, "OUT": str(out), "TOTAL_TINY": "480"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_session.sh"), "--tiny"], env=env, capture_output=True,
                          text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = {p.name for p in out.iterdir()}
    assert {"gpu_check.json", "gpu_check.md", "session.log", "studies.json", "long-recipe.json",
            "device-check.json"} <= files
    assert len(files) <= 8  # what one device call can bring back
    check = json.loads((out / "gpu_check.json").read_text())
    assert {p: v["status"] for p, v in check["parts"].items()} == {p: "ok" for p in ("env", "sync_debug", "pipeline",
                                                                                   "speed_eager")}
    studies = json.loads((out / "studies.json").read_text())
    assert {"layouts", "norms"} <= set(studies)
    rows = studies["layouts"]
    assert rows and all(r["device"] == "cpu" and r["recipe"]["epochs"] == 2 for r in rows)  # the --quick recipe
    long_runs = json.loads((out / "long-recipe.json").read_text())  # the long recipe's variants, side by side
    assert set(long_runs) == {"mini40s1", "stem40s1", "mini80", "stem80", "stem64s1"}
    for name, run in long_runs.items():
        assert run["epochs_done"] == run["epochs_planned"] == 2, (name, run["log_tail"])  # --tiny's --epochs 2 wins
        assert 0 <= run["per_epoch"][-1]["val_top1"] <= 100
        words = run["command"].split()
        assert ("--model-arg stem_stride=1 strides=2,2,2,1" in run["command"]) == name.startswith("stem"), name
        assert (words[words.index("--seed") + 1] == "1") if name.endswith("s1") else "--seed" not in words, name
    assert "--epochs 80" in long_runs["stem80"]["command"] and "--epochs 64" in long_runs["stem64s1"]["command"]
    log = (out / "session.log").read_text()
    assert "campaign exit 0" in log and "from this device" in log
    check_rows = json.loads((out / "device-check.json").read_text())  # the exact-fp32 device check ran too
    assert check_rows and all(r["deterministic"] and r["variant"] == "C-C-T-T" for r in check_rows)
