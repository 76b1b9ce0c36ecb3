"""Tables and plots from a run directory (reads rounds.jsonl and summary.json only).

  python -m dp_jax.report WORKDIR     # rewrite report.md and plots/ of a finished run
"""

from __future__ import annotations

import os
import sys
from collections import defaultdict

import numpy as np

from dp_jax import io

PRETTY = {"imp": "IMP", "random": "Random pruning", "reinit": "Re-init", "dp": "Distilled Pruning",
          "dp_imp": "DP then IMP", "dense": "Dense"}


def pretty(label: str) -> str:
    """Human-readable method label, e.g. ``imp_k200`` -> ``IMP (k=200)``."""
    for base in sorted(PRETTY, key=len, reverse=True):
        if label == base:
            return PRETTY[base]
        if label.startswith(base + "_k"):
            return f"{PRETTY[base]} (k={label[len(base) + 2:]})"
        if label.startswith(base + "_"):
            return f"{PRETTY[base]} of {pretty(label[len(base) + 1:])}"
    return label


def aggregate(rows: list[dict]) -> dict[str, list[dict]]:
    """Per method, per round: mean/std over seeds of sparsity, accuracy and examples."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["method"], r["round"])].append(r)
    out = defaultdict(list)
    for (method, rnd), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        acc = np.array([r["test_accuracy"] for r in rs], dtype=float)
        out[method].append({
            "round": rnd, "n": len(rs),
            "sparsity": float(np.mean([r["sparsity"] for r in rs])),
            "acc_mean": float(acc.mean()), "acc_std": float(acc.std(ddof=1)) if len(rs) > 1 else 0.0,
            "train_examples": float(np.mean([r["train_examples"] for r in rs])),
            "wall_s": float(np.mean([r["wall_s"] for r in rs])),
        })
    return dict(out)


def accuracy_table(agg: dict[str, list[dict]]) -> str:
    """Markdown table: one row per round, one column per method (mean ± std, %)."""
    methods = sorted(agg)
    rounds = sorted({a["round"] for rows in agg.values() for a in rows})
    head = "| round | sparsity | " + " | ".join(pretty(m) for m in methods) + " |"
    sep = "|---|---|" + "---|" * len(methods)
    lines = [head, sep]
    for rnd in rounds:
        cells, sp = [], None
        for m in methods:
            a = next((a for a in agg[m] if a["round"] == rnd), None)
            if a is None:
                cells.append("")
                continue
            sp = a["sparsity"]
            cells.append(f"{100 * a['acc_mean']:.2f} ± {100 * a['acc_std']:.2f} (n={a['n']})")
        lines.append(f"| {rnd} | {100 * (sp or 0):.1f}% | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_accuracy_vs_sparsity(agg: dict[str, list[dict]], path: str, title: str = "") -> None:
    """Test accuracy vs fraction of weights remaining (log axis), mean ± std bands."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in sorted(agg):
        rows = agg[m]
        remaining = np.array([100 * (1 - a["sparsity"]) for a in rows])
        mean = np.array([100 * a["acc_mean"] for a in rows])
        std = np.array([100 * a["acc_std"] for a in rows])
        ax.plot(remaining, mean, marker="o", ms=3, label=pretty(m))
        ax.fill_between(remaining, mean - std, mean + std, alpha=0.2)
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("weights remaining (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title or "Accuracy vs sparsity")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def write_report(workdir: str) -> str:
    """Write report.md and plots/*.png for ``workdir``; returns the report text."""
    rows = io.read_jsonl(os.path.join(workdir, "rounds.jsonl"))
    if not rows:
        raise ValueError(f"{workdir}/rounds.jsonl has no rounds; nothing to report")
    summary_path = os.path.join(workdir, "summary.json")
    summary = io.read_json(summary_path) if os.path.exists(summary_path) else {}
    cfg_path = os.path.join(workdir, "config.json")
    cfg = io.read_json(cfg_path) if os.path.exists(cfg_path) else {}
    agg = aggregate(rows)
    title = f"{cfg.get('model', {}).get('name', '')} on {cfg.get('data', {}).get('name', '')}"
    plot_accuracy_vs_sparsity(agg, os.path.join(workdir, "plots", "accuracy_vs_sparsity.png"), title)
    parts = [f"# Pruning report: {title}", "",
             "Test accuracy (%) of each round's mask, trained on the real training set; "
             "mean ± std over seeds.", "", accuracy_table(agg), "",
             "![accuracy vs sparsity](plots/accuracy_vs_sparsity.png)", ""]
    if summary.get("methods"):
        parts += ["## Cost of the mask search", "",
                  "| method | final sparsity | examples processed by the mask search | wall time (s) |",
                  "|---|---|---|---|"]
        for m, s in sorted(summary["methods"].items()):
            parts.append(f"| {pretty(m)} | {100 * s['final_sparsity']:.1f}% | "
                         f"{s['mask_search_examples']:,} | {s['wall_s']:.0f} |")
        parts += ["", f"Total wall time: {summary.get('wall_s', 0):.0f} s on "
                  f"{summary.get('backend', '?')}.", ""]
    text = "\n".join(parts)
    io.atomic_write_bytes(os.path.join(workdir, "report.md"), text.encode())
    return text


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m dp_jax.report WORKDIR")
    print(write_report(sys.argv[1]))
