"""Training-curve and distillation-loss plots from metrics.jsonl, for the reports.

A killed and resumed run logs the epochs of its recomputed round again; the last row of each
(run, seed, round, epoch) wins, which is the row an uninterrupted run would have written.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from dp_jax.system import figures
from dp_jax.storage import fileio
from dp_jax.rundir import paths as workdir_lib


def metric_rows(workdirs: Sequence[str]) -> list[dict]:
    """Every metrics.jsonl row of ``workdirs``, in order."""
    rows = []
    for d in workdirs:
        rows.extend(fileio.read_jsonl(workdir_lib.metrics_path(d)))
    return rows


def epoch_curves(rows: list[dict], field: str = "loss") -> dict[str, dict[int, np.ndarray]]:
    """``{run label: {round: mean over seeds of field per epoch}}`` of the training rows."""
    last: dict[tuple, float] = {}
    for r in rows:
        if "run" in r and "epoch" in r and isinstance(r.get(field), (int, float)):
            last[(r["run"], r.get("seed", 0), r.get("round", 0), int(r["epoch"]))] = r[field]
    grouped: dict[tuple, dict[int, list]] = {}
    for (run, seed, rnd, epoch), v in last.items():
        grouped.setdefault((run, rnd), {}).setdefault(epoch, []).append(v)
    out: dict[str, dict[int, np.ndarray]] = {}
    for (run, rnd), by_epoch in grouped.items():
        epochs = sorted(by_epoch)
        out.setdefault(run, {})[rnd] = np.array([np.mean(by_epoch[e]) for e in epochs])
    return out


def save_figure(fig, path: str, *, dpi: int = 110) -> None:
    """Write ``fig`` to ``path`` atomically (a reader never sees half a PNG)."""
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=dpi)
    os.replace(tmp, path)


def plot_training_curves(rows: list[dict], path: str, *, pretty=str) -> bool:
    """Write :func:`figure_training_curves` to ``path``; False (nothing written) when there
    are no training rows."""
    fig = figure_training_curves(rows, pretty=pretty)
    if fig is None:
        return False
    save_figure(fig, path)
    return True


def figure_training_curves(rows: list[dict], *, pretty=str):
    """One panel per run label: training loss per epoch, one line per round (darker = later);
    a matplotlib figure, or None when there are no training rows."""
    curves = epoch_curves(rows)
    if not curves:
        return None
    labels = sorted(curves, key=lambda s: (s != workdir_lib.DENSE, s))
    cols = min(3, len(labels))
    nrows = -(-len(labels) // cols)
    fig, axes = figures.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
    viridis = figures.get_cmap("viridis")
    for ax, label in zip(axes.flat, labels):
        rounds = sorted(curves[label])
        for i, rnd in enumerate(rounds):
            y = curves[label][rnd]
            shade = viridis(0.9 - 0.8 * i / max(len(rounds) - 1, 1))
            ax.plot(np.arange(1, len(y) + 1), y, color=shade, lw=1.2,
                    label=f"round {rnd}" if i in (0, len(rounds) - 1) else None)
        ax.set_title(pretty(label), fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel("training loss")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(labels):]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def plot_distillation(rows: list[dict], path: str) -> bool:
    """Distillation loss per iteration (and the periodic evaluation's accuracy, if any).

    Returns False (and writes nothing) when the rows hold no distillation.
    """
    last = {int(r["iteration"]): r for r in rows
            if r.get("phase") == "distill" and "iteration" in r}
    if not last:
        return False
    evals = {int(r["iteration"]): r for r in rows
             if r.get("phase") == "distill_eval" and "accuracy_mean" in r}
    fig, ax = figures.subplots(figsize=(7, 4))
    its = sorted(last)
    ax.plot(its, [last[i]["loss"] for i in its], lw=1.2, label="matching loss (window mean)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("distillation loss")
    ax.grid(True, alpha=0.3)
    if evals:
        ax2 = ax.twinx()
        e = sorted(evals)
        ax2.plot(e, [100 * evals[i]["accuracy_mean"] for i in e], "o-", color="C1", ms=3,
                 label="test accuracy of the set (%)")
        ax2.set_ylabel("test accuracy (%)")
        ax2.legend(loc="upper right", fontsize=8)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("Distillation")
    save_figure(fig, path)
    return True
