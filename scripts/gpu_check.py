"""The prepared GPU check (issue 15): one call on one H100/H200 in at most 8 minutes, every part in its own
process with its own time limit, each part's failure recorded, never fatal.

Parts, in the order they run (the most important first, so that a tight budget drops the least):
  env             torch, CUDA, the GPU, the device plan (coatnet.device_plan) chosen for it
  sync_debug      20 training steps of `coatnet train`'s engine (drop path, RandAugment, Mixup, a JPEG folder) under
                  torch.cuda.set_sync_debug_mode: every host synchronisation inside a step, with the Python line
                  that made it (the host's read of the device's numbers every SYNC_EVERY steps is allowed)
  pipeline        end-to-end training img/s with the real input pipeline on a generated JPEG folder at --img-size
                  against the same steps fed a uint8 batch already on the device (goal >= 0.9)
  parity          inference_model against the eager model on the device: fp32 (TF32 off) to 1e-5, bf16 to 1e-3
  speed_eager     coatnet_0 bf16 training step and inference, interleaved in one process with timm's
                  coatnet_0_rw_224 and coatnet_0_224 (timm optional: without it, ours alone)
  onnx            ONNX exported from a model on the device, checked with onnxruntime; the model stays put
  train_main      the main job (`coatnet train`, the default recipe) on the device in bf16: accuracy, img/s
  compiled_train  as speed_eager, training step only, every model torch.compile'd
  compiled_infer  as speed_eager, inference only, every model torch.compile'd

Writes OUT/gpu_check.json (settings, each part's status, seconds, numbers or error), OUT/gpu_check.md (the
tables) after every part, so a run stopped from outside still leaves what was done, and OUT/gpu_check.log
(each part's output). Without CUDA every part runs on the CPU (`--tiny` makes that quick: the CI test); what
only CUDA has (the sync debug mode) is skipped there with a note, the rest of the part still runs.

  python3 scripts/gpu_check.py --out "$OUT" [--budget 450] [--data-dir DIR] [--parts a,b] [--tiny]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

PARTS = ("env", "sync_debug", "pipeline", "parity", "speed_eager", "onnx", "train_main", "compiled_train",
         "compiled_infer")
# Seconds each part may take at most (it also gets no more than what is left of --budget).
LIMITS = {"env": 60, "sync_debug": 90, "pipeline": 150, "parity": 90, "speed_eager": 120, "onnx": 90,
          "train_main": 150, "compiled_train": 150, "compiled_infer": 150}
PIPELINE_GOAL = 0.9  # training img/s with the real input pipeline over img/s fed from the device
TIMM_MODELS = ("coatnet_0_rw_224", "coatnet_0_224")
# Which of our two forms each timm model is compared with: timm's paper-style coatnet_0_224 strides in the
# depthwise convolution (ours with downsample="dwconv", the same architecture); coatnet_0_rw_224 is timm's
# own, fastest CoAtNet-0, against our paper default.
COUNTERPART = {"coatnet_0_224": "dwconv", "coatnet_0_rw_224": ""}
TOLERANCE = {"fp32": 1e-5, "bf16": 1e-3}  # inference_model vs eager, relative error of the logits
# The goals for bf16 training images/s: ours over timm's.
GOALS = {"coatnet_0_224": 1.2, "coatnet_0_rw_224": 1.0}
SRC = Path(__file__).resolve().parents[1] / "src"


# -- arguments -----------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="coatnet's prepared GPU check (see the module docstring)")
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out", help="folder for the JSON, table, log")
    p.add_argument("--budget", type=float, default=450.0, help="seconds for all parts together")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    p.add_argument("--limit", action="append", default=[], metavar="PART=S", help="another time limit for a part")
    p.add_argument("--device", default="auto", help="auto (cuda when there is one), cuda, cpu")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX files (default: coatnet's default)")
    p.add_argument("--model", default="coatnet_0", help="our model in parity, speed and onnx")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--train-batch", type=int, default=128)
    p.add_argument("--infer-batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=10, help="timed rounds of the interleaved speed parts")
    p.add_argument("--main-args", default="", help="extra `coatnet train` flags for train_main, e.g. '--epochs 3'")
    p.add_argument("--no-timm", action="store_true", help="time ours alone")
    p.add_argument("--tiny", action="store_true",
                   help="a minute-sized configuration for CPUs and CI: coatnet_nano at 32 px, batch 2, no timm, "
                        "train_main on 64 images for one epoch")
    p.add_argument("--part", help=argparse.SUPPRESS)  # internal: run one part in this process
    p.add_argument("--result", help=argparse.SUPPRESS)  # internal: where that part writes its JSON
    p.add_argument("--work", help=argparse.SUPPRESS)  # internal: scratch folder shared by the parts
    args = p.parse_args(argv)
    parts = [x for x in args.parts.split(",") if x]
    unknown = [x for x in parts if x not in PARTS]
    if unknown:
        p.error(f"unknown part(s) {', '.join(unknown)}; known: {', '.join(PARTS)}")
    args.parts = parts
    limits = dict(LIMITS)
    for item in args.limit:
        name, _, value = item.partition("=")
        if name not in PARTS:
            p.error(f"--limit {item}: unknown part {name!r}")
        try:
            limits[name] = float(value)
        except ValueError:
            p.error(f"--limit {item}: {value!r} is not a number of seconds")
    args.limits = limits
    if args.budget <= 0:
        p.error(f"--budget {args.budget} must be positive")
    if args.tiny:
        args.model, args.img_size, args.train_batch, args.infer_batch = "coatnet_nano", 32, 2, 2
        args.repeats, args.no_timm = 2, True
    return args


# -- the parts (each runs in its own process) -----------------------------------------------------------------
def _device(args):
    import torch

    from coatnet.train.runtime import resolve_device

    return resolve_device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))


def part_env(args) -> dict:
    import dataclasses

    import torch

    from coatnet.train.runtime import plan_for

    dev = _device(args)
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(dev),
            "plan": dataclasses.asdict(plan_for(dev)), "cpus": os.cpu_count()}
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1), bf16=torch.cuda.is_bf16_supported(),
                    cudnn=torch.backends.cudnn.version())
    try:
        import timm  # noqa: PLC0415  (optional: only to say which version the speed parts compare with)
        info["timm"] = timm.__version__
    except ImportError:
        info["timm"] = None
    return info


def _jpeg_training(args, folder: Path, steps: int, epochs: int = 1, **overrides):
    """`coatnet.train.TrainConfig` for `steps` optimizer steps per epoch of args.model on the JPEG folder
    `folder` (args.train_batch of its images, repeated within the epoch with fresh augmentation, decoded anew
    each time), with the paper recipe's augmentation and drop path."""
    from coatnet.train import TrainConfig, get_recipe

    dev = _device(args)
    paper = get_recipe("paper")
    aug = {k: paper[k] for k in ("crop_scale", "randaugment_n", "randaugment_m", "mixup", "label_smoothing",
                                 "drop_path")}
    return TrainConfig(data=str(folder), model=args.model, img_size=args.img_size, batch_size=args.train_batch,
                       epochs=epochs, train_subset=args.train_batch, min_epoch_images=steps * args.train_batch,
                       val_fraction=0.25, val_subset=8,
                       device=str(dev), precision="bf16" if dev.type == "cuda" else "fp32",
                       channels_last=dev.type == "cuda", precise_bn=0, progress=False, quiet=True, lr=1e-4,
                       warmup_epochs=0.0, **aug, **overrides)


def _jpeg_folder(args) -> Path:
    """Generated JPEGs (ImageNet-sized, coatnet.pipeline_bench.write_jpeg_folder), enough for a training subset of
    args.train_batch images beside a validation quarter."""
    from coatnet.pipeline_bench import write_jpeg_folder

    images = max(16, -(-args.train_batch * 3 // 2))
    return write_jpeg_folder(Path(args.work) / f"jpegs-{images}", images, classes=4)


def part_sync_debug(args) -> dict:
    """20 training steps under torch.cuda.set_sync_debug_mode("warn"), each synchronising call recorded with
    the Python line that made it ("error" would stop at the first; this lists them all). The host's read of
    the device's numbers (epoch._settle, every SYNC_EVERY steps) runs with the mode off: it is the one read
    meant to be there."""
    import traceback as tb
    import warnings

    import torch

    from coatnet.train import engine, epoch, train

    dev = _device(args)
    steps = 20
    cfg = _jpeg_training(args, _jpeg_folder(args), steps, workers=0 if args.tiny else min(8, os.cpu_count() or 1))
    syncs: dict[str, int] = {}
    cuda = dev.type == "cuda"

    def mode(value):
        if cuda:
            torch.cuda.set_sync_debug_mode(value)

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" in str(message):
            frames = [f for f in tb.extract_stack()[:-1] if "/coatnet/" in f.filename or "gpu_check" in f.filename]
            where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames[::-1][:4])
            syncs[where or f"{filename}:{lineno}"] = syncs.get(where or f"{filename}:{lineno}", 0) + 1

    real_epoch, real_settle = engine.train_one_epoch, epoch._settle

    def watched_epoch(*a, **k):
        mode("warn")
        try:
            return real_epoch(*a, **k)
        finally:
            mode(0)

    def unwatched_settle(*a, **k):
        mode(0)
        try:
            return real_settle(*a, **k)
        finally:
            mode("warn")

    engine.train_one_epoch, epoch._settle = watched_epoch, unwatched_settle
    t0 = time.time()
    try:
        with warnings.catch_warnings():  # restores the filters and showwarning after
            warnings.simplefilter("always")
            warnings.showwarning = record
            res = train(cfg)
    finally:
        engine.train_one_epoch, epoch._settle = real_epoch, real_settle
    out = {"steps": res["steps"], "seconds": round(time.time() - t0, 1), "syncs": syncs,
           "pass": cuda and not syncs and res["steps"] == steps, "model": args.model, "img_size": args.img_size,
           "batch": args.train_batch}
    if not cuda:
        out["note"] = f"set_sync_debug_mode is CUDA's: skipped on {dev.type}; the {steps} steps ran unwatched"
    return out


class DeviceBatches:
    """A training source whose every batch is one uint8 batch already on the device, as many images as asked
    (the same steps as the real pipeline's, with nothing to load): the baseline of the pipeline part."""

    streams = False

    def __init__(self, images, labels, length: int):
        self.images, self.labels, self.length = images, labels, length

    def __len__(self) -> int:
        return self.length

    def batches(self, index_batches, spec, **_):
        from coatnet.data.datasets import Batch

        for idx in index_batches:
            yield Batch(self.images[:len(idx)], self.labels[:len(idx)], idx)


def part_pipeline(args) -> dict:
    """Training img/s (the second epoch's, warm) of `coatnet train` on a generated JPEG folder, against the same
    run with every training batch already on the device."""
    import torch

    from coatnet.data import build_data
    from coatnet.train import run_data, train

    dev = _device(args)
    steps = 4 if args.tiny else 24
    workers = 0 if args.tiny else max(1, (os.cpu_count() or 2) - 2)
    folder = _jpeg_folder(args)
    cfg = _jpeg_training(args, folder, steps, epochs=2, workers=workers)
    runs = {}
    t0 = time.time()
    runs["jpeg_folder"] = train(cfg)
    train_src, val_src, spec = build_data(str(folder), val_fraction=0.25, img_size=args.img_size)
    first = next(train_src.batches([torch.arange(args.train_batch) % len(train_src)], spec))
    on_device = DeviceBatches(first.images.to(dev), first.labels.to(dev), len(train_src))
    real_build = run_data.build_data
    run_data.build_data = lambda *a, **k: (on_device, *real_build(*a, **k)[1:])
    try:
        runs["on_device"] = train(cfg)
    finally:
        run_data.build_data = real_build
    rates = {name: r["img_per_s"] for name, r in runs.items()}  # the last (second) epoch's
    ratio = rates["jpeg_folder"] / rates["on_device"]
    return {"img_per_s": rates, "ratio": ratio, "goal": PIPELINE_GOAL, "met": ratio >= PIPELINE_GOAL,
            "model": args.model, "img_size": args.img_size, "batch": args.train_batch, "workers": workers,
            "steps_per_epoch": steps, "precision": runs["on_device"]["precision"],
            "seconds": round(time.time() - t0, 1)}


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def part_parity(args) -> dict:
    import torch

    import coatnet
    from coatnet.train.runtime import autocast

    dev = _device(args)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32 here
    torch.manual_seed(0)
    model = coatnet.create_model(args.model, img_size=args.img_size).to(dev).eval()
    fast = coatnet.inference_model(model)
    out = {"model": args.model, "img_size": args.img_size}
    for precision, tol in TOLERANCE.items():
        x = torch.randn(4, model.in_chans, args.img_size, args.img_size, device=dev)  # fresh inputs each time
        with torch.inference_mode(), autocast(dev, precision):
            ref, got = model(x).float(), fast(x).float()
        err = _rel(got, ref)
        out[precision] = {"rel_error": err, "tolerance": tol, "pass": bool(err < tol and torch.isfinite(got).all())}
        if precision == "bf16":  # bf16's own noise: the eager model in bf16 against itself in fp32
            with torch.inference_mode():
                out[precision]["eager_bf16_vs_fp32"] = _rel(ref, model(x).float())
    out["pass"] = all(out[p]["pass"] for p in TOLERANCE)
    return out


def timm_factory(name: str, num_classes: int):
    """timm's model `name` (coatnet.bench.timm_model: the package's one import of timm). Tests replace it."""
    from coatnet.bench import timm_model

    return timm_model(name, num_classes)


def _speed(args, train: bool, compile: bool) -> dict:
    import torch

    import coatnet
    from coatnet.bench import make_step, prepare, time_interleaved

    dev = _device(args)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    ours = coatnet.create_model(args.model, img_size=args.img_size)
    models, skipped = {args.model: ours}, {}
    if ours.config.mbconv.downsample != "dwconv":
        models[f"{args.model}:dwconv"] = coatnet.create_model(args.model, img_size=args.img_size, downsample="dwconv")
    if not args.no_timm:
        for name in TIMM_MODELS:
            try:
                models[f"timm:{name}"] = timm_factory(name, ours.num_classes)
            except Exception as e:  # timm missing or without the model: ours are still timed
                skipped[f"timm:{name}"] = f"{type(e).__name__}: {e}"
    batch = args.train_batch if train else args.infer_batch
    x = torch.randn(batch, ours.in_chans, args.img_size, args.img_size, device=dev)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    steps = {}
    for name, m in models.items():
        prepared = prepare(m, dev, train, channels_last=True, compile=compile, ours=not name.startswith("timm:"),
                           precision="bf16")
        steps[name] = make_step(prepared, x_cl, "bf16", train, ours.num_classes)
    t0 = time.time()
    times = time_interleaved(steps, dev, warmup=3 if compile else 2, repeats=args.repeats)
    result = {"step": "train" if train else "inference", "models": {}, "batch": batch, "img_size": args.img_size,
              "compile": compile, "precision": "bf16", "channels_last": True, "skipped": skipped,
              "timed_seconds": time.time() - t0}
    table = result["models"]
    for name, ts in times.items():
        median = statistics.median(ts)
        table[name] = {"images_per_s": batch / median, "ms_per_batch": 1e3 * median,
                       "spread": (max(ts) - min(ts)) / median}
    result["ratios"] = {}  # ours / timm, each timm model against our form of the same design (COUNTERPART)
    for name in table:
        if name.startswith("timm:"):
            timm_name = name.removeprefix("timm:")
            mine = f"{args.model}:{COUNTERPART[timm_name]}" if COUNTERPART.get(timm_name) else args.model
            mine = mine if mine in table else args.model
            result["ratios"][timm_name] = table[mine]["images_per_s"] / table[name]["images_per_s"]
            result.setdefault("compared", {})[timm_name] = mine
    if train:
        result["goals"] = {name: {"ratio": result["ratios"][name], "goal": goal,
                                  "met": result["ratios"][name] >= goal}
                           for name, goal in GOALS.items() if name in result["ratios"]}
    if dev.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
    return result


def part_speed_eager(args) -> dict:
    return {"train": _speed(args, train=True, compile=False), "inference": _speed(args, train=False, compile=False)}


def part_compiled_train(args) -> dict:
    return _speed(args, train=True, compile=True)


def part_compiled_infer(args) -> dict:
    return _speed(args, train=False, compile=True)


def part_onnx(args) -> dict:
    import torch

    import coatnet
    from coatnet.export import export, run_exported

    dev = _device(args)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    model = coatnet.create_model(args.model, img_size=args.img_size).to(dev).eval()
    path = Path(args.work) / f"{args.model}.onnx"
    t0 = time.time()
    export(model, path, "onnx")
    seconds = time.time() - t0
    x = torch.randn(2, model.in_chans, args.img_size, args.img_size)
    with torch.inference_mode():
        ref = model(x.to(dev)).float().cpu()
    err = _rel(run_exported(path, "onnx", x), ref)
    still = {p.device.type for p in model.parameters()}
    return {"model": args.model, "export_seconds": seconds, "bytes": path.stat().st_size,
            "rel_error_vs_device_model": err, "pass": bool(err < 1e-4 and still == {dev.type}),
            "model_device_after_export": sorted(still)}


def main_job_folder(work: str | os.PathLike) -> Path:
    return Path(work) / "main_run"


def part_train_main(args) -> dict:
    """`coatnet train` (the default recipe) on the device in bf16, as a user runs it."""
    dev = _device(args)
    out = main_job_folder(args.work)
    cmd = [sys.executable, "-m", "coatnet", "train", "--device", str(dev), "--precision", "bf16", "--out", str(out),
           "--no-progress", "--auto-resume"]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    if args.tiny:
        cmd += ["--train-subset", "64", "--val-subset", "64", "--epochs", "1", "--batch-size", "32",
                "--precise-bn", "64", "--workers", "0"]
    cmd += args.main_args.split()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    sys.stdout.write(proc.stdout[-4000:])
    sys.stderr.write(proc.stderr[-4000:])
    if proc.returncode != 0:
        raise RuntimeError(f"coatnet train exited {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    final = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**main_job_summary(out), "command": " ".join(cmd[1:]), "final": final}


def main_job_summary(out: Path) -> dict:
    """Accuracy and speed of the main job from its metrics.jsonl (also of a run cut short by its limit)."""
    path = out / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    if not records:
        return {"epochs_done": 0}
    last = records[-1]
    return {"epochs_done": len(records), "val_top1": last["val_top1"], "val_top5": last["val_top5"],
            "best_val_top1": max(r["val_top1"] for r in records if "val_top1" in r),
            "img_per_s_mean": statistics.mean(r["img_per_s"] for r in records),
            "seconds_total": sum(r["seconds"] for r in records)}


PART_FUNCTIONS = {"env": part_env, "sync_debug": part_sync_debug, "pipeline": part_pipeline,
                  "parity": part_parity, "speed_eager": part_speed_eager, "onnx": part_onnx,
                  "train_main": part_train_main, "compiled_train": part_compiled_train,
                  "compiled_infer": part_compiled_infer}


# -- the orchestrator ----------------------------------------------------------------------------------------
def run_part(args, name: str, limit: float, log) -> dict:
    """Run part `name` in a child process for at most `limit` seconds: its record (status ok, failed,
    timeout; seconds; result or error)."""
    result_file = Path(args.work) / f"{name}.json"
    result_file.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", name, "--result", str(result_file),
           "--work", args.work, *_forwarded(args)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           "PYTHONUNBUFFERED": "1"}
    t0 = time.time()
    log.write(f"\n===== {name} (limit {limit:.0f} s) =====\n")
    log.flush()
    # A session of its own: on timeout the part and everything it started (train_main's `coatnet train`) go.
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        proc.wait(timeout=max(limit, 0.1))
        status = "ok" if proc.returncode == 0 and result_file.is_file() else "failed"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        status = "timeout"
    record = {"status": status, "seconds": round(time.time() - t0, 1), "limit_s": round(limit, 1)}
    if result_file.is_file():
        payload = json.loads(result_file.read_text())
        record.update({k: v for k, v in payload.items() if k in ("result", "error")})
    if status != "ok" and "error" not in record:
        record["error"] = f"no result after {record['seconds']} s ({status}); see gpu_check.log"
    if name == "train_main" and status == "timeout":  # the epochs it finished still count
        record["result"] = {**main_job_summary(main_job_folder(args.work)), "cut_short": True}
    return record


def _forwarded(args) -> list[str]:
    out = ["--device", args.device, "--model", args.model, "--img-size", str(args.img_size), "--train-batch",
           str(args.train_batch), "--infer-batch", str(args.infer_batch), "--repeats", str(args.repeats),
           "--main-args", args.main_args]
    if args.data_dir:
        out += ["--data-dir", args.data_dir]
    if args.no_timm:
        out.append("--no-timm")
    if args.tiny:
        out.append("--tiny")
    return out


def run_one_part(args) -> int:
    """The child's side: run the part, write {"result": ...} or {"error": ...} to args.result."""
    try:
        payload = {"result": PART_FUNCTIONS[args.part](args)}
        code = 0
    except Exception as e:
        traceback.print_exc()
        payload, code = {"error": f"{type(e).__name__}: {e}"}, 1
    Path(args.result).write_text(json.dumps(payload, indent=2, default=str))
    return code


def markdown(report: dict) -> str:
    """The report as markdown: the parts, then the speed table (images/s) and the main job."""
    lines = ["# coatnet GPU check", ""]
    env = report["parts"].get("env", {}).get("result") or {}
    lines += [f"device: {env.get('gpu', env.get('device', '?'))}, torch {env.get('torch', '?')}, CUDA "
              f"{env.get('cuda')}, timm {env.get('timm')}; started {report['started']}", "",
              "| part | status | seconds | notes |", "|---|---|---|---|"]
    for name, rec in report["parts"].items():
        lines.append(f"| {name} | {rec['status']} | {rec['seconds']} | {_note(name, rec)} |")
    speed = {}
    for part, key, column in (("speed_eager", "train", "train eager"), ("speed_eager", "inference", "infer eager"),
                              ("compiled_train", None, "train compiled"), ("compiled_infer", None, "infer compiled")):
        res = report["parts"].get(part, {}).get("result")
        if res is None:
            continue
        res = res[key] if key else res
        for model, m in res["models"].items():
            speed.setdefault(model, {})[column] = m["images_per_s"]
    if speed:
        columns = ["train eager", "train compiled", "infer eager", "infer compiled"]
        lines += ["", "bf16 images/s (median; channels-last; ours: training graph for training, inference_model "
                      "for inference):", "", "| model | " + " | ".join(columns) + " |",
                  "|---" * (len(columns) + 1) + "|"]
        for model, row in speed.items():
            lines.append(f"| {model} | " + " | ".join(f"{row[c]:.0f}" if c in row else "-" for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _note(name: str, rec: dict) -> str:
    res = rec.get("result")
    if rec["status"] != "ok" and not res:
        return rec.get("error", "")[:200].replace("|", "/")
    if name == "env":
        return f"{res.get('gpu', res.get('device'))}, capability {res.get('capability', '-')}"
    if name == "parity":
        text = ", ".join(f"{p} {res[p]['rel_error']:.1e} (< {res[p]['tolerance']:g}: {res[p]['pass']})"
                         for p in TOLERANCE)
        floor = res["bf16"].get("eager_bf16_vs_fp32")
        return text + (f"; eager bf16 vs fp32 {floor:.1e}" if floor is not None else "")
    if name == "onnx":
        return f"rel. error {res['rel_error_vs_device_model']:.1e}, model still on {res['model_device_after_export']}"
    if name == "sync_debug":
        found = "; ".join(f"{k} (x{v})" for k, v in res["syncs"].items())[:300].replace("|", "/")
        return res.get("note") or (f"{res['steps']} steps, no sync" if not res["syncs"] else f"syncs: {found}")
    if name == "pipeline":
        rates = res["img_per_s"]
        return (f"JPEG folder {rates['jpeg_folder']:.0f} img/s vs on device {rates['on_device']:.0f}: "
                f"x{res['ratio']:.2f} (goal >= {res['goal']}: {res['met']}; {res['workers']} workers)")
    if name == "train_main":
        if not res.get("epochs_done"):
            return "no epoch finished"
        cut = " (cut short by its limit)" if res.get("cut_short") else ""
        return (f"{res['epochs_done']} epochs{cut}: val top-1 {res['val_top1']:.2f}%, "
                f"{res['img_per_s_mean']:.0f} img/s")
    speed = res if "models" in res else res["train"]  # speed_eager: training's ratios
    goals, ratios = speed.get("goals") or {}, speed.get("ratios") or {}
    text = ", ".join(f"{k} x{v:.2f}" for k, v in ratios.items()) or "ours alone"
    if goals:
        text += "; goals " + ", ".join(f"{k} >= {g['goal']}: {g['met']}" for k, g in goals.items())
    return text


def write_report(out: Path, report: dict) -> None:
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.part:
        return run_one_part(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.work = tempfile.mkdtemp(prefix="coatnet_gpu_check_")
    report = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "budget_s": args.budget,
              "settings": {k: v for k, v in vars(args).items() if k not in ("part", "result", "work", "limit")},
              "parts": {}}
    t0 = time.time()
    with open(out / "gpu_check.log", "a") as log:
        for name in args.parts:
            left = args.budget - (time.time() - t0)
            if left < 5:
                report["parts"][name] = {"status": "skipped", "seconds": 0, "error": "out of budget"}
            else:
                report["parts"][name] = run_part(args, name, min(args.limits[name], left), log)
            write_report(out, report)
            print(f"{name}: {report['parts'][name]['status']} ({report['parts'][name]['seconds']} s)", flush=True)
    report["seconds"] = round(time.time() - t0, 1)
    write_report(out, report)
    print(markdown(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
