#!/usr/bin/env python3
"""Plot images/s against batch size from `coatnet bench --json` lines (ours and timm).

Usage: scripts/plot_bench.py OUT.png RESULTS.jsonl [MORE.jsonl ...]
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(out: str, *paths: str) -> None:
    rows = [json.loads(line) for p in paths for line in open(p) if line.strip()]
    rows.sort(key=lambda r: r["settings"]["batch"])
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("ours", "coatnet"), ("timm", "timm")):
        pts = [(r["settings"]["batch"], r[key]["images_per_s"], r[key]["model"]) for r in rows if r.get(key)]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                    label=pts[0][2] if ":" in pts[0][2] else f"{label}: {pts[0][2]}")
    s = rows[0]["settings"]
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("images/s")
    ax.set_title(f"{s['precision']} {'training' if s['train'] else 'inference'}, {s['img_size']}px, "
                 f"{s['threads']} threads, {s['device']}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main(*sys.argv[1:])
