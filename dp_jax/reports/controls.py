"""The mask controls side by side with their source runs: every run built on another run's masks
(``shuffle:of=``, ``invert:of=``, ``reinit:of=``) against that run, seed by seed.

The question each answers (Frankle et al., ICLR 2021): does the source's accuracy survive when
its masks keep only their per-layer densities (shuffled), are inverted, or train from another
init? The paired difference (control − source, per seed, then mean ± sample std) is the figure:
it removes the seed-to-seed spread both runs share.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Optional

import numpy as np

from dp_jax import methods
from dp_jax.methods.shuffle import label_spec
from dp_jax.pruning import records
from dp_jax.reports.curves import save_figure
from dp_jax.system import figures


def control_pairs(labels) -> list[tuple[str, str]]:
    """``(control, source)`` for every label whose run is built on another run present."""
    present, out = set(labels), []
    for label in sorted(present):
        try:
            source = label_spec(label).source
        except ValueError:  # a label no registered method makes (a plugin's, not loaded)
            continue
        if source is not None and source in present:
            out.append((label, source))
    return out


def paired(rows: list[dict], control: str, source: str) -> list[dict]:
    """Per round trained in both runs: sparsity, each run's accuracies by seed, and the paired
    differences (control − source) over the seeds both have."""
    acc = defaultdict(dict)  # (label, round) -> {seed: accuracy}
    sparsity = {}
    for r in records.evaluated(rows):
        if r["method"] in (control, source) and r["round"] > 0:
            acc[(r["method"], r["round"])][r["seed"]] = r["test_accuracy"]
            sparsity[(r["method"], r["round"])] = r["sparsity"]
    out = []
    for rnd in sorted({k[1] for k in acc}):
        c, s = acc.get((control, rnd), {}), acc.get((source, rnd), {})
        seeds = sorted(set(c) & set(s))
        if not seeds:
            continue
        diff = np.array([c[i] - s[i] for i in seeds])
        out.append({"round": rnd, "sparsity": sparsity[(control, rnd)], "seeds": seeds,
                    "control_acc": [c[i] for i in seeds], "source_acc": [s[i] for i in seeds],
                    "diff_mean": float(diff.mean()),
                    "diff_std": float(diff.std(ddof=1)) if len(seeds) > 1 else None})
    return out


def _pct(values, std: Optional[float] = None) -> str:
    mean = float(np.mean(values))
    std = float(np.std(values, ddof=1)) if std is None and len(values) > 1 else std
    return f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")


def controls_section(rows: list[dict], plot_path: str) -> list[str]:
    """report.md's section on the mask controls (nothing without them); writes its plot."""
    pairs = [(c, s, paired(rows, c, s)) for c, s in control_pairs({r["method"] for r in rows})]
    pairs = [p for p in pairs if p[2]]
    if not pairs:
        return []
    lines = ["## Mask controls against their sources", "",
             "Each control trains the same start point as its source with the source's masks "
             "changed (shuffled within each layer, inverted scores, or a fresh init). "
             "Difference: control − source per seed, mean ± sample std over the seeds both "
             "have (percentage points).", "",
             "| control | source | round | sparsity | source (%) | control (%) | difference (pp) "
             "| seeds |", "|---|---|---|---|---|---|---|---|"]
    for control, source, rows_ in pairs:
        for p in rows_:
            lines.append(f"| {methods.pretty(control)} | {methods.pretty(source)} | "
                         f"{p['round']} | {100 * p['sparsity']:.1f}% | {_pct(p['source_acc'])} | "
                         f"{_pct(p['control_acc'])} | {_pct([p['diff_mean']], p['diff_std'])} | "
                         f"{len(p['seeds'])} |")
    _plot(pairs, plot_path)
    return lines + ["", "![mask controls](plots/controls.png)", ""]


def _plot(pairs, path: str) -> None:
    """Paired differences (control − source) by sparsity, one line per control."""
    fig, ax = figures.subplots(figsize=(7, 4.2))
    for control, source, rows_ in pairs:
        x = [100 * p["sparsity"] for p in rows_]
        y = [100 * p["diff_mean"] for p in rows_]
        err = [100 * (p["diff_std"] or 0.0) for p in rows_]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3,
                    label=f"{methods.pretty(control)} − {methods.pretty(source)}")
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel("control − source (pp, mean ± std over seeds)")
    ax.set_title("Mask controls against their sources")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
