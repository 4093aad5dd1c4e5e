"""`coatnet bench` (throughput, latency, memory, GFLOP/s; side by side with timm) and `coatnet export`
(ONNX / TorchScript, checked against PyTorch)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

COMMANDS = {  # command: its line in `coatnet --help`
    "bench": "images/s, latency, peak memory and GFLOP/s of a model, or of the input pipeline (optionally vs timm)",
    "export": "export a checkpoint to ONNX or TorchScript (dynamic batch), checked to 1e-4",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help=COMMANDS["bench"])
    p.add_argument("--model", default=None, help="registered model name, e.g. coatnet_0 (default: none; needed "
                                                 "unless --input-pipeline)")
    p.add_argument("--batch", type=int, nargs="+", default=None,
                   help="batch size(s); several give one line each (default: 8; --input-pipeline: 64)")
    p.add_argument("--img-size", type=int, default=None, help="input side (default: the model's own, e.g. 32 for "
                                                              "coatnet_nano, 224 for coatnet_0; --input-pipeline: "
                                                              "224)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--train", action="store_true", help="time a training step (forward, backward, SGD update)")
    p.add_argument("--compile", action="store_true", help="torch.compile the models")
    p.add_argument("--channels-last", action="store_true",
                   help="channels-last input (and timm's model / our training model in channels-last memory); "
                        "our inference model always runs channels-last inside")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's, all CPUs; "
                                                                  "--input-pipeline: the CPUs the workers leave)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--downsample", choices=("conv1x1", "dwconv"), default=None,
                   help="where MBConv's stride sits (dwconv: timm's paper-style coatnet_N_224; default: the model's)")
    p.add_argument("--model-arg", nargs="+", action="extend", default=None, metavar="KEY=VALUE",
                   help="set fields of the model's config, as `coatnet train --model-arg` does (e.g. stem_stride=1 "
                        "strides=2,2,2,1; the flag may repeat; default: none)")
    p.add_argument("--compare-timm", action="store_true", help="time timm's matching model interleaved (needs timm)")
    p.add_argument("--timm-model", default=None, help="the timm model to compare with (default: the matching one)")
    p.add_argument("--reuse-memory", action="store_true",
                   help="keep freed memory in the process (glibc malloc setting; both models profit)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5, help="timed runs per model; medians are reported")
    p.add_argument("--json", action="store_true", help="one JSON object per batch size")
    g = p.add_argument_group("input pipeline (--input-pipeline: the training input pipeline alone, no model)")
    g.add_argument("--input-pipeline", action="store_true",
                   help="images/s per DataLoader worker of decoding, crop, flip, the copy and the batch augmentation "
                        "of --recipe, on a folder of JPEGs and on shards written from it, beside timm's loader when "
                        "timm is importable")
    g.add_argument("--data", default=None, help="an image folder (default: --images generated JPEGs)")
    g.add_argument("--shards", default=None, help="a `coatnet shards` folder (default: written from the images)")
    g.add_argument("--images", type=int, default=256, help="JPEGs to generate when --data is not given")
    g.add_argument("--workers", type=int, default=1, help="DataLoader worker processes")
    g.add_argument("--recipe", default="paper", help="whose augmentation (a `coatnet train --recipe` name)")
    p.set_defaults(func=run_bench)

    p = sub.add_parser("export", help=COMMANDS["export"])
    p.add_argument("--checkpoint", required=True, help="a .safetensors training checkpoint or weights file")
    p.add_argument("--format", choices=("onnx", "torchscript"), required=True)
    p.add_argument("--output", default=None, help="output file (default: the checkpoint's name with .onnx / .pt)")
    p.add_argument("--model", default=None, help="architecture of plain weights without a config in their metadata "
                                                        "(default: the one in the checkpoint's metadata)")
    p.add_argument("--num-classes", type=int, default=None, help="with --model: the classifier's class count (default: "
                                                                 "the weights')")
    p.add_argument("--img-size", type=int, default=None, help="input size of the exported graph (default: the model's)")
    p.add_argument("--no-check", action="store_true", help="skip comparing the exported outputs with PyTorch")
    p.add_argument("--bench", action="store_true", help="time the exported file against PyTorch (interleaved)")
    p.add_argument("--batch", type=int, default=8, help="with --bench: batch size")
    p.add_argument("--threads", type=int, default=None, help="with --bench: threads for both runtimes (default: all)")
    p.set_defaults(func=run_export)


def _macs(macs: float) -> str:
    """Multiply-adds with the unit that keeps three significant digits (a 32 px model has 0.003 GMACs)."""
    return f"{macs / 1e9:.2f} GMACs" if macs >= 1e9 else f"{macs / 1e6:.1f} MMACs"


def _fmt(m) -> str:
    return (f"{m.model:<28} {m.images_per_s:>9.2f} img/s {m.latency_ms:>9.1f} ms/batch {m.peak_memory_mb:>8.0f} MB "
            f"{_macs(m.macs_per_image):>11} {m.gflops:>7.1f} GFLOP/s")


def run_input_pipeline_bench(args: argparse.Namespace) -> int:
    from ..pipeline_bench import input_pipeline_bench

    result = input_pipeline_bench(data=args.data, shards=args.shards, images=args.images, img_size=args.img_size or 224,
                                  batch=(args.batch or [64])[0], workers=args.workers, recipe=args.recipe,
                                  device=args.device, threads=args.threads)
    if args.json:
        print(json.dumps(result), flush=True)
        return 0
    s = result["settings"]
    print(f"input pipeline: {s['img_size']}px, --recipe {s['recipe']} augmentation, batch {s['batch']}, "
          f"{s['workers']} worker(s), batch augmentation on {s['device']} ({s['threads']} thread(s))")
    for name, p in result["pipelines"].items():
        ratio = result["ratios"].get(name)
        print(f"  {name:<14} {p['images_per_s']:>9.1f} img/s {p['per_worker']:>9.1f} img/s per worker"
              + (f"   {ratio:.2f}x timm's" if ratio else ""))
    for name, why in result["skipped"].items():
        print(f"  {name:<14} skipped: {why}")
    return 0


def run_bench(args: argparse.Namespace) -> int:
    from ..bench import benchmark
    from ..train.config import parse_model_args

    if args.input_pipeline:
        return run_input_pipeline_bench(args)
    if not args.model:
        raise ValueError("coatnet bench needs --model (or --input-pipeline)")
    set_by_flags = {"img_size": "--img-size", "downsample": "--downsample"}
    overrides = {"downsample": args.downsample, **parse_model_args(tuple(args.model_arg or ()), set_by_flags)}
    for batch in args.batch or [8]:
        if batch < 1:
            raise ValueError(f"--batch {batch} must be at least 1")
        result = benchmark(args.model, batch=batch, img_size=args.img_size, precision=args.precision,
                           train=args.train, compile=args.compile, channels_last=args.channels_last,
                           threads=args.threads, device=args.device, compare_timm=args.compare_timm,
                           timm_name=args.timm_model, overrides=overrides,
                           warmup=args.warmup, repeats=args.repeats,
                           reuse_memory=args.reuse_memory)
        if args.json:
            print(json.dumps(result.to_dict()), flush=True)
            continue
        s = result.settings
        print(f"{s['model']} {s['overrides'] or ''} batch {batch} {s['img_size']}px {s['precision']} "
              f"{'train step' if s['train'] else 'inference'} {s['device']} threads {s['threads']}"
              f"{' compiled' if s['compile'] else ''}{' channels-last' if s['channels_last'] else ''}")
        print("  " + _fmt(result.ours))
        if result.timm is not None:
            print("  " + _fmt(result.timm))
            print(f"  ratio ours/timm: images/s {result.ratios['images_per_s']:.2f}x, "
                  f"peak memory {result.ratios['peak_memory']:.2f}x")
        print(f"  fp32 2048x2048 matmul: {result.matmul_gflops:.1f} GFLOP/s; ours achieves "
              f"{result.ours.gflops / result.matmul_gflops:.2f} of it", flush=True)
    return 0


def run_export(args: argparse.Namespace) -> int:
    from ..export import SUFFIXES, export, export_metadata, load_checkpoint_model, max_relative_error

    overrides = {"num_classes": args.num_classes}
    if args.img_size is not None:
        overrides["img_size"] = args.img_size
    model = load_checkpoint_model(args.checkpoint, args.model, **{k: v for k, v in overrides.items() if v is not None})
    output = Path(args.output) if args.output else Path(args.checkpoint).with_suffix(SUFFIXES[args.format])
    meta = export_metadata(model, args.checkpoint)
    export(model, output, args.format, metadata=meta)
    where = "metadata_props" if args.format == "onnx" else "extra file coatnet.json"
    print(f"wrote {output} ({args.format}, dynamic batch, input {model.in_chans}x"
          f"{'x'.join(map(str, model.config.image_size))}; {where}: {', '.join(meta)})")
    if not args.no_check:
        err = max_relative_error(model, output, args.format)
        print(f"max relative difference to PyTorch at batch 1 and 3: {err:.2e}")
        if err > 1e-4:
            raise ValueError(f"exported outputs differ from PyTorch by {err:.2e} (> 1e-4)")
    if args.bench:
        from ..bench import benchmark_exported

        speeds = benchmark_exported(model, str(output), args.format, batch=args.batch, threads=args.threads)
        print("  ".join(f"{k}: {v:.2f} img/s" for k, v in speeds.items()))
    return 0
