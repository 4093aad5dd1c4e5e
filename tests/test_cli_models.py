"""`coatnet models` and the CLI's error contract."""
import json
import subprocess
import sys

from coatnet.cli import main


def test_models_lists_every_variant_with_params_and_macs(capsys):
    assert main(["models", "--json"]) == 0
    rows = {r["model"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert {f"coatnet_{i}" for i in range(8)} <= set(rows)
    assert abs(rows["coatnet_0"]["params"] / 1e6 - 25) / 25 < 0.03
    assert abs(rows["coatnet_0"]["macs"] / 1e9 - 4.2) / 4.2 < 0.05


def test_a_bad_size_is_one_error_line_and_a_non_zero_exit():
    proc = subprocess.run([sys.executable, "-m", "coatnet", "models", "--img-size", "100"],
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        "error: img_size 100x100 is not a multiple of 32; nearest valid sizes: 96x96 or 96x128 or 128x96 or 128x128"]
    assert "Traceback" not in proc.stderr and proc.stdout == ""
