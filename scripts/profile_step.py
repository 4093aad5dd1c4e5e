"""Where the time of a training step goes, ours beside timm's, per operator (torch.profiler).

    V=$(../shared/tools/timm-env.sh)      # timm runs in its own environment (see the README)
    $V/bin/python scripts/profile_step.py --precision bf16 --batch 8 [--ours-only] [--rows 25]

Builds our coatnet_0 with downsample="dwconv" (timm's coatnet_0_224 architecture) and timm's coatnet_0_224, as
`coatnet bench --train` prepares them (channels-last, our CPU bf16 kernels where the runtime takes them), runs
warm-up steps, then profiles `--steps` training steps of each and prints the operators by self CPU time, the
share of the step each takes, and the two models' totals side by side: the table that says which operators
make one model slower than the other on this CPU.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from coatnet.bench import make_step, prepare, timm_model
from coatnet.models import create_model


def profile_model(name: str, model, batch: torch.Tensor, precision: str, steps: int, warmup: int) -> dict:
    step = make_step(model, batch, precision, True, 1000)
    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        for _ in range(steps):
            step()
    seconds = (time.perf_counter() - t0) / steps
    ops = {}
    for evt in prof.key_averages():
        ops[evt.key] = ops.get(evt.key, 0.0) + evt.self_cpu_time_total / 1e6 / steps
    return {"name": name, "seconds": seconds, "ops": ops}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--ours-only", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device("cpu")
    x = torch.randn(args.batch, 3, args.img_size, args.img_size).contiguous(memory_format=torch.channels_last)
    models = {"ours": prepare(create_model("coatnet_0", downsample="dwconv"), dev, True, channels_last=True,
                              compile=False, ours=True, precision=args.precision)}
    if not args.ours_only:
        models["timm"] = prepare(timm_model("coatnet_0_224"), dev, True, channels_last=True, compile=False,
                                 ours=False, precision=args.precision)
    results = [profile_model(n, m, x, args.precision, args.steps, args.warmup) for n, m in models.items()]
    names = sorted({k for r in results for k in r["ops"]}, key=lambda k: -max(r["ops"].get(k, 0) for r in results))
    head = f"{'operator':<48}" + "".join(f"{r['name'] + ' s':>12}{'%':>6}" for r in results)
    print(f"{args.precision}, batch {args.batch} at {args.img_size}, {torch.get_num_threads()} threads; seconds per "
          f"step (profiled): " + ", ".join(f"{r['name']} {r['seconds']:.3f}" for r in results))
    print(head)
    for k in names[:args.rows]:
        print(f"{k[:47]:<48}" + "".join(f"{r['ops'].get(k, 0):>12.3f}{100 * r['ops'].get(k, 0) / r['seconds']:>6.1f}"
                                        for r in results))


if __name__ == "__main__":
    main()
