"""Figures of the analyses (matplotlib, Agg backend); each is written atomically as a PNG.

Inputs are the JSON objects written to ``workdir/analysis`` (see docs/analysis.md).
"""

from __future__ import annotations

import io as _io
from collections import defaultdict

import numpy as np

from dp_jax.system import figures
from dp_jax.storage import fileio
from dp_jax.reports.pruning import pretty


def _save(fig, path: str) -> None:
    buf = _io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    fileio.atomic_write_bytes(path, buf.getvalue())


def _by_run(rows: list[dict]) -> dict[str, list[dict]]:
    out = defaultdict(list)
    for r in rows:
        out[r["run"]].append(r)
    return {k: sorted(v, key=lambda r: (r["seed"], r["round"])) for k, v in sorted(out.items())}


def _mean_by_round(rows, value):
    groups = defaultdict(list)
    for r in rows:
        groups[r["round"]].append(r)
    pts = []
    for rnd in sorted(groups):
        rs = groups[rnd]
        vals = np.array([value(r) for r in rs], float)
        pts.append((100 * (1 - np.mean([r["sparsity"] for r in rs])), vals.mean(), vals.std()))
    return np.array(pts).reshape(-1, 3)


def _two_vs_sparsity(rows: list[dict], values, names):
    """Two panels: ``values`` (one function of a row each) against weights remaining, one line
    per run (mean ± std over seeds), log axis; returns ``(fig, axes)`` to finish."""
    fig, axes = figures.subplots(1, 2, figsize=(11, 4))
    for label, rs in _by_run(rows).items():
        for ax, f in zip(axes, values):
            p = _mean_by_round(rs, f)
            ax.errorbar(p[:, 0], p[:, 1], yerr=p[:, 2], marker="o", ms=3, capsize=2,
                        label=pretty(label))
    for ax, name in zip(axes, names):
        ax.set_xscale("log")
        ax.invert_xaxis()
        ax.set_xlabel("weights remaining (%)")
        ax.set_ylabel(name)
        ax.grid(True, which="both", alpha=0.3)
    return fig, axes


def _first_seed_panels(rows: list[dict]):
    """One panel per run with its first seed's rows in round order and a colour per row:
    ``(fig, [(ax, label, seed, rows, colours)])``."""
    groups = _by_run(rows)
    fig, axes = figures.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.6), squeeze=False)
    cmap = figures.get_cmap("viridis")
    panels = []
    for ax, (label, rs) in zip(axes[0], groups.items()):
        seed = rs[0]["seed"]
        rs = [r for r in rs if r["seed"] == seed]
        panels.append((ax, label, seed, rs, [cmap(i / max(len(rs) - 1, 1))
                                             for i in range(len(rs))]))
    return fig, panels


def barrier_vs_sparsity(rows: list[dict], path: str) -> None:
    """Error and loss barriers against weights remaining, one line per run (mean ± std, seeds)."""
    fig, axes = _two_vs_sparsity(rows, (lambda r: 100 * r["barrier"],
                                        lambda r: r["loss_barrier"]),
                                 ("error barrier (pp)", "loss barrier"))
    axes[0].axhline(2.0, color="gray", ls="--", lw=1, label="stability threshold (2 pp)")
    axes[0].legend(fontsize=8)
    axes[0].set_title("Instability vs sparsity")
    axes[1].set_title("Loss barrier vs sparsity")
    _save(fig, path)


def interpolation_curves(rows: list[dict], path: str) -> None:
    """Test error along the path, one panel per run, one line per round (first seed)."""
    fig, panels = _first_seed_panels(rows)
    for ax, label, seed, rs, colours in panels:
        for r, colour in zip(rs, colours):
            ax.plot(r["alphas"], 100 * np.asarray(r["error"]), marker=".", color=colour,
                    label=f"r{r['round']} ({100 * r['sparsity']:.0f}% pruned)")
        ax.set_title(f"{pretty(label)} (seed {seed})")
        ax.set_xlabel("alpha")
        ax.set_ylabel("test error (%)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, path)


def rewind_curves(curves: list[dict], path: str) -> None:
    """Dense-network error barrier against the rewind step k, one line per seed."""
    fig, ax = figures.subplots(figsize=(6, 4))
    for c in curves:
        ax.plot(c["k"], 100 * np.asarray(c["barrier"]), marker="o", label=f"seed {c['seed']}")
    ax.axhline(2.0, color="gray", ls="--", lw=1)
    ax.set_xlabel("rewind step k (copies start from the dense weights at step k)")
    ax.set_ylabel("error barrier (pp)")
    ax.set_title("Dense network: instability vs rewind step")
    ax.grid(True, alpha=0.3)
    ax.legend()
    _save(fig, path)


def hessian_vs_sparsity(rows: list[dict], path: str) -> None:
    """Top eigenvalue and trace of the restricted Hessian against weights remaining."""
    names = ("top Hessian eigenvalue", "Hessian trace (Hutchinson)")
    fig, axes = _two_vs_sparsity(rows, (lambda r: r["top_eigenvalues"][0], lambda r: r["trace"]),
                                 names)
    for ax, name in zip(axes, names):
        ax.set_title(name + " (trained copy)")
    axes[0].legend(fontsize=8)
    _save(fig, path)


def hessian_density(rows: list[dict], path: str) -> None:
    """SLQ spectral densities (log scale), one panel per run, one line per round (first seed)."""
    fig, panels = _first_seed_panels(rows)
    for ax, label, seed, rs, colours in panels:
        for r, colour in zip(rs, colours):
            d = r["density"]
            ax.semilogy(d["grid"], np.maximum(d["density"], 1e-12), color=colour,
                        label=f"r{r['round']}")
        ax.set_ylim(bottom=1e-6)
        ax.set_title(f"{pretty(label)} (seed {seed})")
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, path)


def landscape(r: dict, path: str) -> None:
    """One mask's landscapes: 1-D lines, the plane through three copies, random 2-D (contours)."""
    panels = 3 if "plane" in r else 2
    fig, axes = figures.subplots(1, panels, figsize=(4.6 * panels, 4))
    ax = axes[0]
    ax.plot(r["interpolation"]["alphas"], r["interpolation"]["loss"], marker=".",
            label="copy 0 -> copy 1 (alpha)")
    ax.plot(r["random_1d"]["t"], r["random_1d"]["loss"], marker=".",
            label="random filter-normalised (t)")
    ax.set_xlabel("alpha / t")
    ax.set_ylabel("test loss")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("1-D")
    ax = axes[1]
    t = np.asarray(r["random_2d"]["t"])
    loss = np.asarray(r["random_2d"]["loss"])
    cs = ax.contourf(t, t, np.log10(loss), levels=20, cmap="viridis")
    fig.colorbar(cs, ax=ax, label="log10 test loss")
    ax.plot([0], [0], "r*", ms=10)
    ax.set_xlabel("direction 1")
    ax.set_ylabel("direction 2")
    ax.set_title("random directions (filter-normalised)")
    if "plane" in r:
        ax = axes[2]
        p = r["plane"]
        cs = ax.contourf(p["x"], p["y"], 100 * np.asarray(p["error"]), levels=20, cmap="magma")
        fig.colorbar(cs, ax=ax, label="test error (%)")
        pts = np.asarray(p["points"])
        ax.plot(pts[:, 0], pts[:, 1], "w^", ms=8)
        for i, (x, y) in enumerate(pts):
            ax.annotate(f"copy {i}", (x, y), color="w", xytext=(4, 4), textcoords="offset points")
        ax.set_aspect("equal")
        ax.set_title("plane through three copies")
    fig.suptitle(f"{pretty(r['run'])}, seed {r['seed']}, round {r['round']} "
                 f"({100 * r['sparsity']:.1f}% pruned)")
    _save(fig, path)
