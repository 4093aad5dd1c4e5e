"""The report of a study: docs/results/<study>.md (setup, table, plot, and a reading of the numbers
against the paper's claims, with differences inside the seed / sampling noise called so) and <study>.png.

The reading is computed from the rows, so it cannot drift from them. A hand-written interpretation may be
added in <study>.notes.md beside the results; it is included verbatim.
"""
from __future__ import annotations

import math
import os
import re
import statistics
from pathlib import Path
from typing import Optional

from ..utils import atomic_write
from .definitions import Study

METRICS = ("train_loss", "train_top1", "val_top1", "gap_top1")


# -- aggregation ---------------------------------------------------------------------------------------
def aggregate(rows: list[dict]) -> dict[tuple[str, int], dict]:
    """{(variant, train_size): {metric: (mean, sd or None, n_seeds), "params", "seconds", "seeds"}}."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["variant"], r["train_size"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        agg = {"seeds": sorted(r["seed"] for r in rs), "params": rs[0]["params"],
               "seconds": statistics.fmean(r["seconds"] for r in rs)}
        for m in METRICS:
            vals = [r[m] for r in rs]
            agg[m] = (statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else None, len(vals))
        out[key] = agg
    return out


def seed_sd(rows: list[dict], metric: str, train_size: Optional[int] = None) -> tuple[Optional[float], str]:
    """Pooled standard deviation of `metric` over seeds (groups with two or more seeds), at train_size if
    it has such groups, else over all sizes; and a word on where it came from."""
    def pooled(size: Optional[int]) -> Optional[float]:
        groups: dict[tuple[str, int], list[float]] = {}
        for r in rows:
            if size is None or r["train_size"] == size:
                groups.setdefault((r["variant"], r["train_size"]), []).append(r[metric])
        variances = [statistics.variance(v) for v in groups.values() if len(v) > 1]
        return math.sqrt(statistics.fmean(variances)) if variances else None

    sd = pooled(train_size) if train_size is not None else None
    if sd is not None:
        return sd, f"seed s.d. at n={train_size:,}"
    sd = pooled(None)
    return (sd, "seed s.d. pooled over the repeated sizes") if sd is not None else (None, "no repeated seeds")


def binomial_se(top1: float, n: int) -> float:
    p = min(max(top1 / 100.0, 1e-6), 1 - 1e-6)
    return 100.0 * math.sqrt(p * (1 - p) / max(n, 1))


# -- comparisons against a claimed ordering -------------------------------------------------------------
_RELATIONS = (">>", ">=", ">", "~")


def parse_chain(chain: str) -> tuple[list[str], list[str]]:
    """"A ~ B >= C > D >> E" -> (["A", "B", "C", "D", "E"], ["~", ">=", ">", ">>"])."""
    parts = re.split(r"\s*(>>|>=|>|~)\s*", chain.strip())
    names, rels = parts[0::2], parts[1::2]
    if len(names) != len(rels) + 1 or any(not n for n in names):
        raise ValueError(f"cannot read the ordering {chain!r}")
    return names, rels


def compare_chain(chain: str, values: dict[str, tuple[float, int]], sd: float, higher_is_better: bool = True
                  ) -> list[dict]:
    """Every pair (a before b) of the claimed chain, with the paper's relation between them (">" if any
    step between them is strict, ">=" if any is ">=", else "~"), our difference (a - b, oriented so that
    positive means a is better), the noise band (2 s.d. of a difference of means) and a verdict."""
    names, rels = parse_chain(chain)
    out = []
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            a, b = names[i], names[j]
            if a not in values or b not in values:
                continue
            between = rels[i:j]
            rel = ">" if any(r in (">", ">>") for r in between) else (">=" if ">=" in between else "~")
            (ma, ka), (mb, kb) = values[a], values[b]
            diff = (ma - mb) if higher_is_better else (mb - ma)
            if not sd:  # no noise estimate: the sign alone, said so
                verdict = ("cannot tell" if rel == "~" else "agrees" if diff > 0 else "reversed") \
                    + " (no noise estimate)"
                out.append({"a": a, "rel": rel, "b": b, "diff": diff, "noise": None, "verdict": verdict})
                continue
            noise = 2 * sd * math.sqrt(1 / ka + 1 / kb)
            if abs(diff) <= noise:
                verdict = "agrees (within noise)" if rel in ("~", ">=") else "within noise"
            elif rel == "~":
                verdict = "differs"
            elif diff > 0:
                verdict = "agrees"
            else:
                verdict = "reversed"
            out.append({"a": a, "rel": rel, "b": b, "diff": diff, "noise": noise, "verdict": verdict})
    return out


def _chain_of(claim: str) -> str:
    return claim.split(":", 1)[1].strip()


# -- the markdown --------------------------------------------------------------------------------------
def _fmt(agg_value: tuple[float, Optional[float], int], digits: int = 2) -> str:
    mean, sd, n = agg_value
    return f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")


def _table(study: Study, agg: dict) -> list[str]:
    lines = ["| variant | train size | params | seeds | train loss | train top-1 | val top-1 | gap (train-val) "
             "| seconds |", "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    sizes = sorted({s for _, s in agg})
    for size in sizes:
        for v in study.variant_names:
            a = agg.get((v, size))
            if a is None:
                continue
            lines.append(f"| {v} | {size:,} | {a['params'] / 1e6:.3f}M | {','.join(map(str, a['seeds']))} | "
                         f"{_fmt(a['train_loss'], 4)} | {_fmt(a['train_top1'])} | {_fmt(a['val_top1'])} | "
                         f"{_fmt(a['gap_top1'])} | {a['seconds']:.0f} |")
    return lines


def plot(study: Study, rows: list[dict], path: str | os.PathLike) -> None:
    """val top-1, generalization gap and train loss against training-set size, one line per variant
    (error bars: seed s.d. where repeated)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = aggregate(rows)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (metric, label) in zip(axes, (("val_top1", "val top-1 (%)"), ("gap_top1", "train top-1 - val top-1"),
                                          ("train_loss", "train loss (eval mode)"))):
        for v in study.variant_names:
            pts = sorted((s, a[metric]) for (name, s), a in agg.items() if name == v)
            if not pts:
                continue
            xs = [s for s, _ in pts]
            ys = [m[0] for _, m in pts]
            es = [m[1] or 0.0 for _, m in pts]
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=v)
        ax.set_xscale("log")
        ax.set_xlabel("training images")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{study.title} (Fashion-MNIST)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _chain_checks(rows, values, chain, n: int, metrics) -> list[str]:
    """For each (metric, label, unit, higher_is_better): the measured ordering at training-set size n, the
    seed noise, and how each pair of the paper's chain fares, as Markdown lines."""
    out = []
    for metric, label, unit, higher in metrics:
        sd, where = _noise(rows, metric, n)
        vals = values(metric, n)
        pairs = compare_chain(chain, vals, sd, higher)
        out += [f"*{label}* at n={n:,}: {_ordering(vals, higher)}. Noise: {where}. "
                f"Pairs of the paper's ordering: {_summary(pairs)}.", ""] + _pairs_table(pairs, unit) + [""]
    return out


def _pairs_table(pairs: list[dict], unit: str) -> list[str]:
    lines = ["| claim | ours: difference | noise band (2 s.d.) | verdict |", "|---|---:|---:|---|"]
    for p in pairs:
        band = f"±{p['noise']:.2f}" if p["noise"] is not None else "n/a"
        lines.append(f"| {p['a']} {p['rel']} {p['b']} | {p['diff']:+.2f}{unit} | {band} | {p['verdict']} |")
    return lines


def _summary(pairs: list[dict]) -> str:
    counts: dict[str, int] = {}
    for p in pairs:
        counts[p["verdict"]] = counts.get(p["verdict"], 0) + 1
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1])) or "no pairs measured"


def _noise(rows: list[dict], metric: str, size: int) -> tuple[float, str]:
    sd, where = seed_sd(rows, metric, size)
    if metric in ("val_top1", "gap_top1"):
        # sampling noise of the measurement itself (binomial), the floor of any seed-based estimate
        vals = [r for r in rows if r["train_size"] == size]
        se = 0.0
        for r in vals:
            v = binomial_se(r["val_top1"], r.get("val_images", 10_000))
            t = binomial_se(r["train_top1"], r.get("train_eval_images", 1_000)) if metric == "gap_top1" else 0.0
            se = max(se, math.sqrt(v * v + t * t))
        if sd is None or sd < se:
            what = "of the test accuracy" if metric == "val_top1" else "of train and test accuracy"
            return se, f"binomial s.e. {what} ({se:.2f})" + (f"; {where} {sd:.2f}" if sd else "")
    if sd is None:
        return 0.0, "no noise estimate (one seed only)"
    return sd, f"{where} = {sd:.3f}"


def _epochs(rows: list[dict], size: int) -> str:
    r = rows[0]["recipe"]
    return f"{r['steps'] * r['batch_size'] / size:.2g}"


def _ordering(values: dict[str, tuple[float, int]], higher_is_better: bool) -> str:
    ranked = sorted(values, key=lambda k: values[k][0], reverse=higher_is_better)
    return "best first: " + ", ".join(f"{k} ({values[k][0]:.2f})" for k in ranked)


def reading(study: Study, rows: list[dict]) -> list[str]:
    """The comparison of the rows with the paper's claims (markdown lines)."""
    if not rows:
        return ["No rows yet."]
    agg = aggregate(rows)
    sizes = sorted({r["train_size"] for r in rows})
    small, large = sizes[0], sizes[-1]

    def values(metric: str, size: int, sign: float = 1.0) -> dict[str, tuple[float, int]]:
        return {v: (sign * a[metric][0], a[metric][2]) for (v, s), a in agg.items() if s == size}

    out: list[str] = []
    unfit = {v: a["train_top1"][0] for (v, size), a in agg.items() if size == small and a["train_top1"][0] < 90}
    if unfit:
        out += [f"**Caution: not every model fits the smallest set in the budget.** At n={small:,} "
                + ", ".join(f"{v} reaches only {t:.1f}% train top-1" for v, t in unfit.items())
                + ". A small gap there means under-fitting, not better generalization; the paper's comparison "
                "is at equal train loss, which these rows do not reach.", ""]
    if study.name == "layouts":
        gen_claim, cap_claim = study.paper_claims
        chain = _chain_of(gen_claim)
        out += [f"**Generalization** (paper: {chain}). Measured at the smallest training set "
                f"(n={small:,}, {_epochs(rows, small)} epochs), where a model can "
                "over-fit. The paper compares the train/val gap at equal train loss; our models reach different "
                "train losses in the same budget, so we give both the test accuracy (higher is better) and "
                "the gap (smaller is better), with the train losses beside them in the table.", ""]
        out += _chain_checks(rows, values, chain, small, (("val_top1", "val top-1", " pt", True),
                                                          ("gap_top1", "gap train-val top-1", " pt", False)))
        chain = _chain_of(cap_claim)
        out += [f"**Capacity** (paper: {chain}). Measured at the largest training set (n={large:,}, "
                f"{_epochs(rows, large)} epoch), where no model can "
                "memorise: lower train loss means the model fits the data better in the same budget.", ""]
        out += _chain_checks(rows, values, chain, large, (("train_loss", "train loss", "", False),
                                                          ("val_top1", "val top-1", " pt", True)))
    elif study.name == "attention":
        out += [f"**Paper:** {study.paper_claims[0]}.", ""]
        for size in sizes:
            for metric, label, higher in (("val_top1", "val top-1", True), ("gap_top1", "gap", False)):
                sd, where = _noise(rows, metric, size)
                vals = values(metric, size)
                pairs = compare_chain("relative > none", vals, sd, higher) + \
                    compare_chain("relative ~ relative_post", vals, sd, higher)
                out += [f"n={size:,}, *{label}*: {_ordering(vals, higher)}; noise: {where}."] + \
                    [f"- relative {p['rel']} {p['b']}: difference {p['diff']:+.2f} pt "
                     f"({'±' + format(p['noise'], '.2f') if p['noise'] is not None else 'no noise estimate'}): "
                     f"{p['verdict']}" for p in pairs] + [""]
    elif study.name == "norms":
        out += [f"**Paper:** {study.paper_claims[0]}.", ""]
        for size in sizes:
            sd, where = _noise(rows, "val_top1", size)
            pairs = compare_chain("layernorm ~ batchnorm", values("val_top1", size), sd, True)
            out += [f"- n={size:,}: val top-1 layernorm - batchnorm = {p['diff']:+.2f} pt (noise "
                    f"{'±' + format(p['noise'], '.2f') if p['noise'] is not None else 'n/a'}, {where}): "
                    f"{'similar' if p['verdict'].startswith('agrees') else 'not similar'}" for p in pairs]
        speed = {}
        for r in rows:
            if "bench_train_img_s" in r:
                speed[r["variant"]] = (r["bench_train_img_s"], r["bench_infer_img_s"])
        if {"layernorm", "batchnorm"} <= set(speed):
            (lt, li), (bt, bi) = speed["layernorm"], speed["batchnorm"]
            out += ["", "**Speed** (same process, alternating rounds, medians; batch 128 training steps and "
                    "batch 500 inference forwards at 32x32, 1 thread):", "",
                    "| variant | train img/s | inference img/s |", "|---|---:|---:|",
                    f"| layernorm | {lt:.0f} | {li:.0f} |", f"| batchnorm | {bt:.0f} | {bi:.0f} |", "",
                    f"BatchNorm / LayerNorm: training {bt / lt:.2f}x, inference {bi / li:.2f}x."]
    return out


def _sharing(rows: list[dict]) -> str:
    """What the rows recorded about other jobs on the machine (runner.machine_load), as a list item."""
    known = [r for r in rows if "nice" in r and "load_avg" in r]
    if not known:
        return "- whether the machine was shared is not recorded in these rows"
    nice = max(r["nice"] for r in known)
    busy = max(r["load_avg"] / max(r.get("cpus") or 1, 1) for r in known)
    parts = ([f"niced (nice {nice})"] if nice > 0 else []) + (
        [f"1-minute load up to {busy:.1f}x the CPU count when a row started"] if busy > 0.5 else [])
    if parts:
        return "- shared with other jobs: " + ", ".join(parts)
    return f"- not niced, load at most {busy:.1f}x the CPU count when a row started (an idle machine)"


def write_report(study: Study, rows: list[dict], out_dir: str | os.PathLike, command: str,
                 planned: Optional[list] = None) -> Path:
    """Write <study>.md and <study>.png into out_dir; returns the markdown path."""
    out_dir = Path(out_dir)
    png = out_dir / f"{study.name}.png"
    if rows:
        plot(study, rows, png)
    agg = aggregate(rows)
    recipe = rows[0]["recipe"] if rows else None
    machines = sorted({r["machine"] for r in rows})
    lines = [f"# {study.title}", "", study.question, ""]
    have = {r["run_key"] for r in rows}
    if planned is not None:
        missing = [p for p in planned if p.key not in have]
        if missing:
            lines += [f"**Incomplete:** {len(planned) - len(missing)} of {len(planned)} planned rows finished. "
                      "Missing: " + ", ".join(f"{p.variant.name} n={p.train_size:,} seed {p.seed}" for p in missing)
                      + ". The table and the reading use the finished rows only.", ""]
        else:
            lines += [f"All {len(planned)} planned rows finished.", ""]
    lines += ["## Command", "", "```", command, "```", "",
              "Resumable: rerunning the command skips the rows already in the JSON file.", "",
              "## Machine", ""] + [f"- {m}" for m in machines] + [
              _sharing(rows) + "; seconds are wall-clock and noisy: compare them only within a "
              "study, and use the side-by-side timings for speed claims.", "",
              "## Setup", "",
              "- Data: Fashion-MNIST, training subsets drawn (seeded) from the 60,000 training images; val = the "
              "10,000 test images" + (f" (a seeded subset of {recipe['val_subset']:,})" if recipe and
                                       recipe.get("val_subset") else "") + ". 28x28 resized (bilinear) to 32x32, one channel.",
              "- Models: the library's CoAtNet (`coatnet.create_model('coatnet_0', **overrides)`), shrunk to about "
              "0.6M parameters; CoAtNet layouts with a stride-1 stem (S1..S4 at 16, 8, 4, 2 pixels), ViT-Rel with "
              "8x8 patches (a 4x4 token grid, the resolution of S3 here, as the paper's 16x16 patches match its S3).",
              ]
    if recipe:
        images = recipe["steps"] * recipe["batch_size"]
        lines += [f"- Recipe (every row): {recipe['steps']} AdamW steps of batch {recipe['batch_size']} "
                  f"({images:,} training images) whatever the training-set size; learning rate "
                  f"{recipe['lr']:g}, constant after a {recipe['warmup_steps']}-step linear warmup; weight decay "
                  f"{recipe['weight_decay']:g}; gradient clip {recipe['clip_grad']:g}; no augmentation, no label "
                  f"smoothing, no stochastic depth; {recipe['threads']} CPU thread. Epochs seen: "
                  + ", ".join(f"{images / n:.2g} at n={n:,}" for n in sorted({r['train_size'] for r in rows})) + ".",
                  f"- train loss / train top-1: eval mode, no augmentation, on a seeded sample of up to "
                  f"{recipe['train_eval_images']:,} of the row's own training images (`train_loss_running` in the JSON is the engine's running loss "
                  "of its last completed epoch, null when a row stopped inside its first epoch); gap = train top-1 - val top-1."]
    lines += ["", "Models (overrides of coatnet_0; parameters with a 10-class head):", "",
              "| variant | overrides | params |", "|---|---|---:|"]
    for v in study.variants:
        params = next((r["params"] for r in rows if r["variant"] == v.name), None)
        ov = ", ".join(f"{k}={tuple(x) if isinstance(x, list) else x}" for k, x in v.overrides.items())
        lines.append(f"| {v.name} | `{ov}` | {f'{params / 1e6:.3f}M' if params else '-'} |")
    lines += ["", "## Results", "", "Mean ± seed s.d. where a row was repeated with several seeds.", ""]
    lines += _table(study, agg) + [""]
    if rows:
        lines += [f"![{study.name}]({png.name})", ""]
    lines += ["## Reading against the paper", "",
              "Computed from the rows above. A difference is called *within noise* when it is smaller than two "
              "standard deviations of a difference of means, the standard deviation being the pooled seed "
              "s.d. (or, for test accuracy, the binomial standard error of the test-set size when larger).", ""]
    lines += reading(study, rows) + [""]
    notes = out_dir / f"{study.name}.notes.md"
    if notes.is_file():
        lines += ["## Interpretation", "", notes.read_text().strip(), ""]
    md = out_dir / f"{study.name}.md"
    with atomic_write(md) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return md
