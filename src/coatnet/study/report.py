"""The report of a study: <out>/<study>.md (setup, machine, commands, tables with mean and seed s.d., the
convergence evidence, plots, and a reading of the numbers against the paper's claims, with differences inside
the seed / sampling noise called so) and <study>.png.

The reading is computed from the rows, so it cannot drift from them. A hand-written interpretation may be
added in <study>.notes.md beside the results; it is included verbatim.

The paper's two axes (Sec. 3.2, Fig. 2 and 3) as measured here:
- generalization: the test accuracy a model reaches at a given final training loss (its Fig. 2 plots one
  against the other), read off each layout's curve through its four training-set sizes at the training losses
  C-C-T-T reaches; and the train-test gap;
- capacity: how low the training loss goes on the largest set, and how test accuracy grows with data.
"""
from __future__ import annotations

import json
import math
import os
import re
import statistics
from pathlib import Path
from typing import Optional

from ..utils import atomic_write, figure
from .definitions import BASE_MODEL, Study

METRICS = ("train_loss", "train_top1", "test_top1", "gap_top1", "loss_change_last20")
# A row converged when its training loss moved less than this (relative) over the last 20% of its steps.
CONVERGED = 0.03
REFERENCE = "C-C-T-T"  # the layouts whose training losses the others are compared at


# -- aggregation ---------------------------------------------------------------------------------------
def aggregate(rows: list[dict]) -> dict[tuple[str, int], dict]:
    """{(variant, train_size): {metric: (mean, sd or None, n_seeds), "params", "seconds", "seeds", "devices"}}."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["variant"], r["train_size"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        agg = {"seeds": sorted(r["seed"] for r in rs), "params": rs[0]["params"],
               "seconds": statistics.fmean(r["seconds"] for r in rs),
               "devices": sorted({r.get("device_name", "?") for r in rs}),
               "epochs_seen": rs[0].get("epochs_seen"), "steps": rs[0].get("steps")}
        for m in METRICS:
            vals = [r[m] for r in rs if r.get(m) is not None]
            agg[m] = (statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else None, len(vals)) \
                if vals else (float("nan"), None, 0)
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


def at_train_loss(curve: list[tuple[float, float]], loss: float) -> Optional[float]:
    """Test top-1 at training loss `loss` on a variant's curve `curve` [(train loss, test top-1)] in order of
    training-set size: walking from the smallest set, the first segment between two sizes whose losses enclose
    `loss`, linear in log(train loss) along it; None when no segment does. (The final loss need not rise with
    the data: the full set gets more steps than the smaller ones, so the first crossing is the one read.)"""
    if any(math.isclose(loss, l0) for l0, _ in curve[:1]):
        return curve[0][1]
    for (l0, a0), (l1, a1) in zip(curve, curve[1:]):
        if min(l0, l1) <= loss <= max(l0, l1):
            if l1 == l0:
                return (a0 + a1) / 2
            t = (math.log(loss) - math.log(l0)) / (math.log(l1) - math.log(l0))
            return a0 + t * (a1 - a0)
    return None


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


def _pct(agg_value: tuple[float, Optional[float], int]) -> str:
    mean, sd, _ = agg_value
    return "n/a" if math.isnan(mean) else f"{100 * mean:+.1f}%" + (f" ± {100 * sd:.1f}" if sd is not None else "")


def _table(study: Study, agg: dict) -> list[str]:
    lines = ["| variant | n | params | seeds | epochs seen | steps | train loss | train top-1 | test top-1 "
             "| gap (train-test) | loss change, last 20% of steps | s/row |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for size in sorted({s for _, s in agg}):
        for v in study.variant_names:
            a = agg.get((v, size))
            if a is None:
                continue
            seen = f"{a['epochs_seen']:.3g}" if a.get("epochs_seen") else "-"
            lines.append(f"| {v} | {size:,} | {a['params'] / 1e6:.3f}M | {','.join(map(str, a['seeds']))} | {seen} | "
                         f"{a['steps'] or '-'} | {_fmt(a['train_loss'], 4)} | {_fmt(a['train_top1'])} | "
                         f"{_fmt(a['test_top1'])} | {_fmt(a['gap_top1'])} | {_pct(a['loss_change_last20'])} | "
                         f"{a['seconds']:.0f} |")
    return lines


def _variant_style(names: list[str]) -> dict[str, tuple[str, str]]:
    colours = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")
    markers = ("o", "s", "^", "D", "v", "P")
    return {n: (colours[i % len(colours)], markers[i % len(markers)]) for i, n in enumerate(names)}


def plot(study: Study, rows: list[dict], path: str | os.PathLike) -> None:
    """Three panels like the paper's Fig. 2 and 3: final training loss (x, log) against test top-1 (y), one
    marker per variant and training-set size, lines joining a variant's sizes; test top-1 against training-set
    size (log x), mean with the seed s.d. and every seed's row as a dot; and the train-test gap against size."""
    agg = aggregate(rows)
    style = _variant_style(study.variant_names)
    fig = figure(figsize=(16, 4.6))
    axes = fig.subplots(1, 3)
    for v in study.variant_names:
        colour, marker = style[v]
        pts = sorted((s, a) for (name, s), a in agg.items() if name == v)
        if not pts:
            continue
        xs = [a["train_loss"][0] for _, a in pts]
        ys = [a["test_top1"][0] for _, a in pts]
        axes[0].plot(xs, ys, color=colour, marker=marker, label=v)
        for (s, _), x, y in zip(pts, xs, ys):
            axes[0].annotate(f"{s // 1000}k" if s >= 1000 else str(s), (x, y), fontsize=7,
                             textcoords="offset points", xytext=(4, -9))
        sizes = [s for s, _ in pts]
        axes[1].errorbar(sizes, ys, yerr=[a["test_top1"][1] or 0.0 for _, a in pts], color=colour, marker=marker,
                         capsize=3, label=v)
        axes[2].errorbar(sizes, [a["gap_top1"][0] for _, a in pts], yerr=[a["gap_top1"][1] or 0.0 for _, a in pts],
                         color=colour, marker=marker, capsize=3, label=v)
        seeds = [(r["train_size"], r["test_top1"]) for r in rows if r["variant"] == v]
        axes[1].scatter([s for s, _ in seeds], [t for _, t in seeds], color=colour, s=9, alpha=0.5)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("final training loss (eval mode, on the row's training images; log)")
    axes[0].set_ylabel("test top-1 (%)")
    axes[0].set_title("generalization: test accuracy at a given training loss", fontsize=9)
    for ax in axes[1:]:
        ax.set_xscale("log")
        ax.set_xlabel("training images (log)")
    axes[1].set_ylabel("test top-1 (%)")
    axes[1].set_title("capacity: accuracy as data grows (bars: seed s.d.; dots: seeds)", fontsize=9)
    axes[2].set_ylabel("train top-1 - test top-1 (points)")
    axes[2].set_title("train-test gap", fontsize=9)
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{study.title} (Fashion-MNIST, 32x32)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _noise(rows: list[dict], metric: str, size: int) -> tuple[float, str]:
    """The noise of a mean of `metric` per seed at `size`: the pooled seed s.d., or for test accuracy the
    binomial standard error of the test-set size where that is larger."""
    sd, where = seed_sd(rows, metric, size)
    if metric in ("test_top1", "gap_top1"):
        at = [r for r in rows if r["train_size"] == size]
        se = 0.0
        for r in at:
            v = binomial_se(r["test_top1"], r.get("test_images", 10_000))
            t = binomial_se(r["train_top1"], r.get("train_eval_images", 2_000)) if metric == "gap_top1" else 0.0
            se = max(se, math.sqrt(v * v + t * t))
        if sd is None or sd < se:
            what = "of the test accuracy" if metric == "test_top1" else "of train and test accuracy"
            return se, f"binomial s.e. {what} ({se:.2f})" + (f"; {where} {sd:.2f}" if sd else "")
    if sd is None:
        return 0.0, "no noise estimate (one seed only)"
    return sd, f"{where} = {sd:.3g}"


def _pairs_table(pairs: list[dict], unit: str) -> list[str]:
    lines = ["| the paper's claim | ours: difference (positive: the first is better) | noise band (2 s.d.) | verdict |",
             "|---|---:|---:|---|"]
    for p in pairs:
        band = f"±{p['noise']:.3g}" if p["noise"] is not None else "n/a"
        lines.append(f"| {p['a']} {p['rel']} {p['b']} | {p['diff']:+.3g}{unit} | {band} | {p['verdict']} |")
    return lines


def _summary(pairs: list[dict]) -> str:
    counts: dict[str, int] = {}
    for p in pairs:
        counts[p["verdict"]] = counts.get(p["verdict"], 0) + 1
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1])) or "no pairs measured"


def _ordering(values: dict[str, tuple[float, int]], higher_is_better: bool, digits: int = 2) -> str:
    ranked = sorted(values, key=lambda k: values[k][0], reverse=higher_is_better)
    return "best first: " + ", ".join(f"{k} ({values[k][0]:.{digits}f})" for k in ranked)


def _check(rows, chain: str, vals: dict, metric: str, size: int, label: str, unit: str, higher: bool,
           digits: int = 2) -> list[str]:
    sd, where = _noise(rows, metric, size)
    pairs = compare_chain(chain, vals, sd, higher)
    return [f"*{label}*: {_ordering(vals, higher, digits)}. Noise: {where}. Pairs of the paper's ordering: "
            f"{_summary(pairs)}.", ""] + _pairs_table(pairs, unit) + [""]


def equal_loss_accuracy(agg: dict, variants: list[str], reference: str = REFERENCE
                        ) -> list[tuple[int, float, dict[str, Optional[float]]]]:
    """[(size, the reference variant's train loss at that size, {variant: test top-1 at that train loss})]:
    each variant's test accuracy read off its own curve through its training-set sizes (at_train_loss)."""
    curves = {v: [(a["train_loss"][0], a["test_top1"][0]) for (name, _), a in sorted(agg.items(), key=lambda kv:
                                                                                       kv[0][1]) if name == v]
              for v in variants}
    out = []
    for size in sorted(s for (name, s) in agg if name == reference)[:-1]:  # the largest: more steps (see below)
        loss = agg[(reference, size)]["train_loss"][0]
        out.append((size, loss, {v: at_train_loss(curves[v], loss) for v in variants}))
    return out


def _generalization(study: Study, rows: list[dict], agg: dict, sizes: list[int]) -> list[str]:
    chain = _chain_of(study.paper_claims[0])
    names = study.variant_names
    small = sizes[0]
    n_seeds = {v: agg[(v, small)]["test_top1"][2] for v in names if (v, small) in agg}
    out = [f"### Generalization (paper, Fig. 2: {chain})", "",
           "**Test accuracy at equal training loss**, as the paper measures it: each layout's test top-1 read off "
           "its curve through the training-set sizes (left panel; walking from the smallest set, the first segment "
           "between two sizes that reaches the loss, linear in log training loss along it) at the final training "
           f"losses {REFERENCE} reaches on the smaller sets. '-': the layout's curve does not reach that loss. "
           "The full set's rows have more optimizer steps than the others (the rule's 10 epochs of 60,000 images), "
           "so curves turn back towards lower losses at the end; the full set is read in the capacity section.", "",
           "| at the train loss of | loss | " + " | ".join(names) + " |",
           "|---|---:|" + "---:|" * len(names)]
    table = equal_loss_accuracy(agg, names)
    for size, loss, accs in table:
        out.append(f"| {REFERENCE} n={size:,} | {loss:.4f} | "
                   + " | ".join("-" if accs[v] is None else f"{accs[v]:.2f}" for v in names) + " |")
    out.append("")
    for size, loss, accs in table:  # the comparison where every layout's curve covers the loss
        vals = {v: (a, n_seeds.get(v, 1)) for v, a in accs.items() if a is not None}
        if len(vals) >= 3:
            out += _check(rows, chain, vals, "test_top1", size, f"test top-1 at train loss {loss:.4f} "
                          f"({REFERENCE}'s at n={size:,})", " pt", True)
    for size in sizes[:2]:
        vals = {v: (a["gap_top1"][0], a["gap_top1"][2]) for (v, s), a in agg.items() if s == size}
        out += _check(rows, chain, vals, "gap_top1", size, f"train-test gap (top-1 points, smaller is better) at "
                      f"n={size:,}", " pt", False)
        vals = {v: (a["test_top1"][0], a["test_top1"][2]) for (v, s), a in agg.items() if s == size}
        out += _check(rows, chain, vals, "test_top1", size, f"test top-1 at n={size:,}", " pt", True)
    return out


def _capacity(study: Study, rows: list[dict], agg: dict, sizes: list[int]) -> list[str]:
    chain = _chain_of(study.paper_claims[1])
    large = sizes[-1]
    out = [f"### Capacity (paper, Fig. 3: {chain})", ""]
    vals = {v: (a["train_loss"][0], a["train_loss"][2]) for (v, s), a in agg.items() if s == large}
    out += _check(rows, chain, vals, "train_loss", large, f"final training loss at n={large:,} (lower: fits more)",
                  "", False, 4)
    vals = {v: (a["test_top1"][0], a["test_top1"][2]) for (v, s), a in agg.items() if s == large}
    out += _check(rows, chain, vals, "test_top1", large, f"test top-1 at n={large:,}", " pt", True)
    if len(sizes) >= 2:
        lo, hi = sizes[-2], sizes[-1]
        gains = {v: (agg[(v, hi)]["test_top1"][0] - agg[(v, lo)]["test_top1"][0], 1)
                 for v in study.variant_names if (v, hi) in agg and (v, lo) in agg}
        first = {v: agg[(v, hi)]["test_top1"][0] - agg[(v, sizes[0])]["test_top1"][0]
                 for v in study.variant_names if (v, hi) in agg and (v, sizes[0]) in agg}
        out += [f"*Growth with data*: test top-1 gained from n={lo:,} to n={hi:,}: {_ordering(gains, True)}; "
                f"from n={sizes[0]:,} to n={hi:,}: "
                + ", ".join(f"{v} {g:+.2f}" for v, g in sorted(first.items(), key=lambda kv: -kv[1])) + " points.", ""]
    return out


def _speed_lines(out_dir: Path, study: Study) -> list[str]:
    path = out_dir / f"{study.name}.speed.json"
    try:
        entries = json.loads(path.read_text()) if path.is_file() else []
    except json.JSONDecodeError:
        entries = []
    if not entries:
        return []
    names = study.variant_names
    lines = ["", "**Speed**, measured side by side in one process (alternating rounds, medians; training steps of "
             "the recipe's batch and inference forwards of 500 images at 32x32, fp32 and channels-last as the rows "
             "train):", "", "| device | " + " | ".join(f"{v} train img/s" for v in names) + " | "
             + " | ".join(f"{v} inference img/s" for v in names) + " | training ratio |",
             "|---|" + "---:|" * (2 * len(names) + 1)]
    for e in entries:
        sp = e.get("variants", {})
        if not all(v in sp for v in names):
            continue
        ratio = sp[names[0]]["train_img_s"] / sp[names[1]]["train_img_s"] if len(names) == 2 else float("nan")
        lines.append(f"| {e.get('device_name', '?')} | " + " | ".join(f"{sp[v]['train_img_s']:.0f}" for v in names)
                     + " | " + " | ".join(f"{sp[v]['infer_img_s']:.0f}" for v in names) + f" | "
                     f"{names[0]}/{names[1]} {ratio:.2f}x |")
    return lines


def reading(study: Study, rows: list[dict], out_dir: Optional[Path] = None) -> list[str]:
    """The comparison of the rows with the paper's claims (markdown lines)."""
    if not rows:
        return ["No rows yet."]
    agg = aggregate(rows)
    sizes = sorted({r["train_size"] for r in rows})
    out: list[str] = []
    if study.name == "layouts":
        out += _generalization(study, rows, agg, sizes) + _capacity(study, rows, agg, sizes)
    elif study.name == "attention":
        out += [f"**Paper:** {study.paper_claims[0]}.", ""]
        for size in sizes:
            vals = {v: (a["test_top1"][0], a["test_top1"][2]) for (v, s), a in agg.items() if s == size}
            out += _check(rows, "relative > none", vals, "test_top1", size, f"test top-1 at n={size:,}", " pt", True)
            out += _check(rows, "relative ~ relative_post", vals, "test_top1", size,
                          f"test top-1 at n={size:,}, pre- against post-softmax bias", " pt", True)
            vals = {v: (a["gap_top1"][0], a["gap_top1"][2]) for (v, s), a in agg.items() if s == size}
            out += _check(rows, "relative > none", vals, "gap_top1", size, f"train-test gap at n={size:,}", " pt",
                          False)
    elif study.name == "norms":
        out += [f"**Paper:** {study.paper_claims[0]}.", ""]
        for size in sizes:
            vals = {v: (a["test_top1"][0], a["test_top1"][2]) for (v, s), a in agg.items() if s == size}
            out += _check(rows, "batchnorm ~ layernorm", vals, "test_top1", size, f"test top-1 at n={size:,}",
                          " pt", True)
            vals = {v: (a["train_loss"][0], a["train_loss"][2]) for (v, s), a in agg.items() if s == size}
            out += _check(rows, "batchnorm ~ layernorm", vals, "train_loss", size, f"final training loss at "
                          f"n={size:,}", "", False, 4)
        if out_dir is not None:
            out += _speed_lines(out_dir, study)
    return out


def _machines(rows: list[dict]) -> list[str]:
    """One line per device the rows ran on: how many rows, the precision, how many shared it at a time."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r.get("device_name", "?"), r.get("device", "cpu"), r.get("precision", "?"),
                           r.get("parallel", 1), r.get("machine", "?")), []).append(r)
    lines = []
    for (name, device, precision, parallel, machine), rs in sorted(groups.items()):
        tf32 = " (matrix products and convolutions in TF32, torch's default for fp32 on this GPU)" \
            if device == "cuda" and precision == "fp32" else ""
        lines.append(f"- {len(rs)} rows on {name}: {machine}; {precision}{tf32}; {parallel} rows trained at a time"
                     + (", each in its own process, so seconds per row are wall-clock under sharing" if parallel > 1
                        else "") + "; " + _sharing(rs, parallel))
    if len(groups) > 1:
        lines.append("- **The rows come from more than one device or precision**: the table mixes them (its "
                     "columns do not say which row ran where; the JSON does).")
    return lines


def _sharing(rows: list[dict], parallel: int = 1) -> str:
    """What the rows recorded about other jobs on the machine (runner.machine_load): niceness and the 1-minute
    load when a row finished, beyond what the study's own parallel rows explain."""
    known = [r for r in rows if "nice" in r and "load_avg" in r]
    if not known:
        return "whether the machine was shared is not recorded in these rows"
    nice = max(r["nice"] for r in known)
    cpus = max(max(r.get("cpus") or 1, 1) for r in known)
    busy = max(r["load_avg"] for r in known) / cpus
    own = (parallel / cpus) if parallel > 1 else 0.0  # the study's own rows load the machine that much
    parts = ([f"niced (nice {nice})"] if nice > 0 else []) + (
        [f"1-minute load up to {busy:.1f}x the CPU count"] if busy > own + 0.5 else [])
    if parts:
        return "shared with other jobs: " + ", ".join(parts)
    return f"not niced, load at most {busy:.1f}x the CPU count (no other job)"


def write_report(study: Study, rows: list[dict], out_dir: str | os.PathLike, command: str,
                 planned: Optional[list] = None) -> Path:
    """Write <study>.md and <study>.png into out_dir; returns the markdown path."""
    out_dir = Path(out_dir)
    png = out_dir / f"{study.name}.png"
    if rows:
        plot(study, rows, png)
    agg = aggregate(rows)
    recipe = rows[0]["recipe"] if rows else None
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
    example = rows[0].get("command") if rows else None
    lines += ["## Commands", "", "```", command, f"{command} --plan      # every row, its estimated cost here, the "
              "total", "```", "",
              "Resumable: rerunning the command skips the rows already in the JSON file (a GPU runs many rows at once: "
              "`--device cuda --parallel 12`, scripts/gpu_session.sh). Each row records the command that trains it "
              "again" + (f", e.g. `{example}`." if example else "."), "", "## Machine", ""] + _machines(rows) + [""]
    lines += ["## Setup", "",
              "- Data: Fashion-MNIST, training subsets drawn (seeded) from the 60,000 training images; test = the "
              "10,000 test images" + (f" (a seeded subset of {recipe['val_subset']:,})" if recipe and
                                      recipe.get("val_subset") else "")
              + ". 28x28 resized (bilinear) to 32x32, one channel.",
              f"- Models: {BASE_MODEL} (the main job's model) and layouts built from it, parameters with a 10-class "
              "head below; ViT-Rel takes 8x8 patches (a 4x4 token grid, the resolution of the Transformer stages of "
              "C-C-T-T here, as the paper's 16x16 patches give ViT-Rel its S3's)."]
    if recipe:
        epochs, floor = recipe["epochs"], recipe["min_epoch_images"]
        sizes = sorted({r["train_size"] for r in rows})
        lines += [f"- Recipe (every row; the main job's): AdamW lr {recipe['lr']:g}, {recipe['warmup_epochs']:g}"
                  f"-epoch warmup then cosine to {recipe['min_lr']:g}, batch {recipe['batch_size']}, weight decay "
                  f"{recipe['weight_decay']:g}, gradient clip {recipe['clip_grad']:g}, label smoothing "
                  f"{recipe['label_smoothing']:g}, horizontal flip p={recipe['hflip']:g}, {recipe['precision']}; "
                  f"BatchNorm statistics re-estimated before scoring; test images scored with their mirror image.",
                  f"- Convergence rule: {epochs} epochs of max(n, {floor:,}) images, a smaller set repeated within an "
                  "epoch (reshuffled, augmented anew): "
                  + ", ".join(f"{r_epochs(n, epochs, floor):.3g} passes over n={n:,}" for n in sizes)
                  + ". Evidence per row: the relative change of the training loss over the last 20% of the steps "
                  "(mean of the last tenth against the tenth before); a row with |change| < "
                  f"{CONVERGED:.0%} counts as converged.",
                  f"- Scores, after training, from the last checkpoint: train loss / train top-1 in eval mode without "
                  f"augmentation on a seeded sample of up to {recipe['train_eval_images']:,} of the row's own training "
                  "images (the final training loss of the paper's Fig. 2); test top-1 on the test images; gap = train "
                  "top-1 - test top-1."]
        flagged = [r for r in rows if r.get("loss_change_last20") is None or abs(r["loss_change_last20"]) >= CONVERGED]
        changes = [abs(r["loss_change_last20"]) for r in rows if r.get("loss_change_last20") is not None]
        lines.append(f"- Converged: {len(rows) - len(flagged)} of {len(rows)} rows"
                     + (f" (largest |change| {max(changes):.1%})" if changes else "")
                     + ("" if not flagged else "; not: " + ", ".join(f"{r['variant']} n={r['train_size']:,} seed "
                                                                      f"{r['seed']}" for r in flagged)) + ".")
    lines += ["", "| variant | overrides of " + BASE_MODEL + " | params |", "|---|---|---:|"]
    for v in study.variants:
        params = next((r["params"] for r in rows if r["variant"] == v.name), None)
        ov = ", ".join(f"{k}={tuple(x) if isinstance(x, list) else x}" for k, x in v.overrides.items())
        lines.append(f"| {v.name} | `{ov}` | {f'{params:,}' if params else '-'} |")
    lines += ["", "## Results", "", "Mean ± seed s.d. over the seeds listed.", ""]
    lines += _table(study, agg) + [""]
    if rows:
        lines += [f"![{study.name}]({png.name})", ""]
    lines += ["## Reading against the paper", "",
              "Computed from the rows above. A difference is called *within noise* when it is smaller than two "
              "standard deviations of a difference of means, the standard deviation being the pooled seed "
              "s.d. (or, for test accuracy, the binomial standard error of the test-set size when larger).", ""]
    lines += reading(study, rows, out_dir) + [""]
    notes = out_dir / f"{study.name}.notes.md"
    if notes.is_file():
        lines += ["## Interpretation", "", notes.read_text().strip(), ""]
    md = out_dir / f"{study.name}.md"
    with atomic_write(md) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return md


def r_epochs(n: int, epochs: int, floor: int) -> float:
    """Passes over a training set of n images under the rule (epochs of max(n, floor) images)."""
    return epochs * max(n, floor) / n
