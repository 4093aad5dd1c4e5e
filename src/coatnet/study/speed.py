"""Side-by-side speed of study models: training steps and inference forwards, interleaved in one process.

Timings on a shared machine are noisy; measuring the variants in alternating rounds and keeping each one's
median makes their ratio meaningful even when the absolute numbers are not.
"""
from __future__ import annotations

import statistics
import time
from typing import Optional

import torch

from ..models import create_model
from ..train.runtime import setup_runtime
from .definitions import BASE_MODEL, Recipe, Variant


def time_variants(variants: tuple[Variant, ...], recipe: Recipe, rounds: int = 5, steps: int = 3,
                  batch_size: Optional[int] = None, infer_batch_size: int = 500, device: str = "cpu",
                  threads: Optional[int] = None) -> dict[str, dict]:
    """{variant name: {"train_img_s", "infer_img_s"}}: medians over `rounds` alternating rounds of
    `steps` AdamW training steps (batch (batch_size, 1, S, S), the recipe's by default) and `steps` eval
    forwards, in the recipe's precision and channels-last as the engine trains, on `device`."""
    runtime = setup_runtime(device, recipe.precision, channels_last=True, threads=threads)
    dev = runtime.device
    batch_size = batch_size or recipe.batch_size
    gen = torch.Generator().manual_seed(0)
    size = recipe.img_size
    x = runtime.inputs(torch.randn(batch_size, 1, size, size, generator=gen))
    y = torch.randint(0, 10, (batch_size,), generator=gen).to(dev)
    x_eval = runtime.inputs(torch.randn(infer_batch_size, 1, size, size, generator=gen))
    models, opts = {}, {}
    for v in variants:
        torch.manual_seed(0)
        m = runtime.prepare(create_model(BASE_MODEL, **v.overrides, img_size=size, in_chans=1, num_classes=10))
        models[v.name], opts[v.name] = m, torch.optim.AdamW(m.parameters(), lr=1e-4)
    train_rates: dict[str, list[float]] = {v.name: [] for v in variants}
    infer_rates: dict[str, list[float]] = {v.name: [] for v in variants}

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def train_steps(name: str, n: int) -> float:
        m, opt = models[name], opts[name]
        m.train()
        sync()
        t = time.perf_counter()
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            with runtime.autocast():
                logits = m(x)
            torch.nn.functional.cross_entropy(logits.float(), y).backward()
            opt.step()
        sync()
        return time.perf_counter() - t

    @torch.no_grad()
    def infer_steps(name: str, n: int) -> float:
        m = models[name].eval()
        sync()
        t = time.perf_counter()
        for _ in range(n):
            with runtime.autocast():
                m(x_eval)
        sync()
        return time.perf_counter() - t

    for v in variants:  # warm-up round, not recorded
        train_steps(v.name, 1)
        infer_steps(v.name, 1)
    for r in range(rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for v in order:
            train_rates[v.name].append(steps * batch_size / train_steps(v.name, steps))
            infer_rates[v.name].append(steps * infer_batch_size / infer_steps(v.name, steps))
    return {v.name: {"train_img_s": statistics.median(train_rates[v.name]),
                     "infer_img_s": statistics.median(infer_rates[v.name]),
                     "rounds": rounds, "batch_size": batch_size} for v in variants}
