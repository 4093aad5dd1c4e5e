"""Crash drill: train a small run, SIGKILL it at random moments, resume it to the end, and check what a
user would check. Each trial:

  1. start `coatnet train` (Fashion-MNIST subset, --deterministic, a checkpoint every --save-every steps),
  2. SIGKILL it after a seeded random delay, then `coatnet train --resume RUN`; repeat --kills times
     (a kill that would come after the run ended is not made and is counted as "missed"),
  3. resume to the end and check: exit code 0, metrics.jsonl lists epochs 1..N once each and in order,
     checkpoint-last loads and is at epoch N, no temporary files are left, stderr has no traceback, and the
     final weights equal those of an uninterrupted run (bit for bit).

Usage (from the repository root):
  PYTHONPATH=src python3 scripts/crash_drill.py --trials 10 --kills 3 --seed 0 [--delays 0 8] [--data DIR]
Prints one line per trial and a summary; exits 1 if any trial failed a check.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from coatnet.train.checkpoint import load_model, read_checkpoint, read_progress

ROOT = Path(__file__).resolve().parents[1]


DATA: list[str] = []  # set by main(): the data flags


def train_args(run: Path, epochs: int, save_every: int) -> list[str]:
    return [*DATA, "--epochs", str(epochs), "--batch-size", "64", "--threads", "1", "--save-every",
            str(save_every), "--deterministic", "--no-progress", "--quiet", "--out", str(run)]


def start(*argv: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    return subprocess.Popen([sys.executable, "-m", "coatnet", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def temporaries(run: Path) -> list[str]:
    return sorted(n for n in os.listdir(run) if n.startswith(".tmp") or n.endswith(".tmp")) if run.is_dir() else []


def trial(rng: random.Random, workdir: Path, kills: int, delays: tuple[float, float], epochs: int,
          save_every: int, reference: dict) -> dict:
    run = workdir / "run"
    events, errors = [], []
    argv = ["train", *train_args(run, epochs, save_every)]
    for k in range(kills):
        proc = start(*argv)
        delay = rng.uniform(*delays)
        try:
            proc.wait(timeout=delay)
            out, err = proc.communicate()
            events.append({"kill": k + 1, "delay_s": round(delay, 2), "missed": True, "rc": proc.returncode})
            if proc.returncode != 0:
                errors.append(f"run ended with rc {proc.returncode} before kill {k + 1}: {err.strip()[-300:]}")
            break
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        state = run / "checkpoint-last.state.safetensors"
        step = read_progress(state)["global_step"] if state.is_file() else None
        events.append({"kill": k + 1, "delay_s": round(delay, 2), "step_on_disk": step,
                       "left_mid_write": temporaries(run)})
        if "Traceback" in err:
            errors.append(f"traceback before kill {k + 1}: {err[-300:]}")
        argv = ["train", "--resume", str(run)] if (run / "config.json").is_file() else argv
    proc = start(*argv)
    out, err = proc.communicate(timeout=1800)
    if proc.returncode != 0 or "Traceback" in err:
        errors.append(f"final resume: rc {proc.returncode}: {err.strip()[-300:]}")
        return {"events": events, "errors": errors}
    epochs_logged = [json.loads(s)["epoch"] for s in (run / "metrics.jsonl").read_text().splitlines()]
    if epochs_logged != list(range(1, epochs + 1)):
        errors.append(f"metrics.jsonl epochs {epochs_logged}")
    _, _, info = load_model(run / "checkpoint-last.safetensors")
    if info["epoch"] != epochs:
        errors.append(f"checkpoint-last at epoch {info['epoch']}")
    if temporaries(run):
        errors.append(f"temporaries left: {temporaries(run)}")
    weights, _ = read_checkpoint(run / "checkpoint-last.safetensors")
    if weights.keys() != reference.keys() or not all(torch.equal(weights[k], reference[k]) for k in weights):
        errors.append("final weights differ from the uninterrupted run")
    return {"events": events, "errors": errors}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--kills", type=int, default=3)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--save-every", type=int, default=3)
    p.add_argument("--delays", type=float, nargs=2, default=(0.0, 8.0), metavar=("LO", "HI"),
                   help="each kill comes uniformly in [LO, HI] seconds after its process started")
    p.add_argument("--data", default="fashion-mnist",
                   help="fashion-mnist (a 512-image subset) or an ImageFolder (at 32x32, 2 loader workers)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    DATA[:] = (["--train-subset", "512", "--val-subset", "256"] if args.data == "fashion-mnist" else
               ["--data", args.data, "--img-size", "32", "--val-fraction", "0.25", "--workers", "2"])
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="coatnet-drill-") as tmp:
        t0 = time.time()
        ref = start("train", *train_args(Path(tmp) / "reference", args.epochs, args.save_every))
        _, err = ref.communicate()
        assert ref.returncode == 0, err
        reference, _ = read_checkpoint(Path(tmp) / "reference" / "checkpoint-last.safetensors")
        print(f"uninterrupted run: {time.time() - t0:.1f} s")
        failed = 0
        counts = {"kills": 0, "missed": 0, "before_first_checkpoint": 0, "mid_write": 0}
        for t in range(args.trials):
            workdir = Path(tmp) / f"trial{t}"
            workdir.mkdir()
            res = trial(rng, workdir, args.kills, tuple(args.delays), args.epochs, args.save_every, reference)
            for e in res["events"]:
                if e.get("missed"):
                    counts["missed"] += 1
                    continue
                counts["kills"] += 1
                counts["before_first_checkpoint"] += e["step_on_disk"] is None
                counts["mid_write"] += bool(e["left_mid_write"])
            failed += bool(res["errors"])
            print(json.dumps({"trial": t, **res}), flush=True)
        print(json.dumps({"trials": args.trials, "failed": failed, **counts}))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
