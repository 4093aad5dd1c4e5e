"""scripts/merge_rows.py: a device call's study rows merged into the recorded files, new rows appended once,
rows of another recipe refused with nothing written."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("merge_rows", ROOT / "scripts" / "merge_rows.py")
merge_rows = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(merge_rows)


def _row(key: str, recipe_id: str = "r1", device: str = "cpu") -> dict:
    return {"run_key": key, "recipe_id": recipe_id, "device": device, "variant": "C-C-T-T", "train_size": 1000,
            "seed": 0, "test_top1": 80.0}


def test_new_rows_are_appended_once_and_recorded_rows_kept(tmp_path):
    recorded = [_row("a"), _row("b")]
    (tmp_path / "layouts.json").write_text(json.dumps(recorded))
    speed = [{"device_name": "cpu x", "measured_at": "t0", "variants": {}}]
    (tmp_path / "norms.speed.json").write_text(json.dumps(speed))
    back = {"layouts": [_row("a"), _row("b"), _row("c", device="cuda")],
            "norms.speed": speed + [{"device_name": "H200", "measured_at": "t1", "variants": {}}],
            "norms": [_row("n1", recipe_id="r2")]}
    bundle = tmp_path / "studies.json"
    bundle.write_text(json.dumps(back))
    assert merge_rows.main([str(bundle), "--into", str(tmp_path)]) == 0
    layouts = json.loads((tmp_path / "layouts.json").read_text())
    assert [r["run_key"] for r in layouts] == ["a", "b", "c"]
    assert [r["measured_at"] for r in json.loads((tmp_path / "norms.speed.json").read_text())] == ["t0", "t1"]
    assert json.loads((tmp_path / "norms.json").read_text()) == [_row("n1", recipe_id="r2")]  # a new file
    assert merge_rows.main([str(bundle), "--into", str(tmp_path)]) == 0  # merging again adds nothing
    assert len(json.loads((tmp_path / "layouts.json").read_text())) == 3


def test_rows_of_another_recipe_are_refused_and_nothing_is_written(tmp_path, capsys):
    (tmp_path / "layouts.json").write_text(json.dumps([_row("a")]))
    (tmp_path / "norms.json").write_text(json.dumps([_row("n")]))
    bundle = tmp_path / "studies.json"
    bundle.write_text(json.dumps({"norms": [_row("n"), _row("n2")], "layouts": [_row("a"), _row("x", "r9")]}))
    assert merge_rows.main([str(bundle), "--into", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another recipe" in err and "recipe_id r9" in err
    assert len(json.loads((tmp_path / "norms.json").read_text())) == 1  # the valid study was not written either
    assert len(json.loads((tmp_path / "layouts.json").read_text())) == 1


@pytest.mark.parametrize("content", ["not json", "[1, 2]", '{"layouts": 3}'])
def test_a_bad_bundle_is_a_one_line_error(tmp_path, capsys, content):
    bundle = tmp_path / "studies.json"
    bundle.write_text(content)
    assert merge_rows.main([str(bundle), "--into", str(tmp_path)]) == 1
    assert capsys.readouterr().err.startswith("merge_rows: ")
