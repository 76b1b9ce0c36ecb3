r"""Does the distilled set's quality decide Distilled Pruning's? (docs/paper.md, claim C5)

  python -m dp_jax.distill.quality --out=DIR --sparsities=0.893,0.956 \
      mtt=runs/distill_mtt,runs/dp_mtt  gm=runs/distill_gm,runs/dp_gm \
      real=runs/distill_gm#random,runs/prune:subset_n100 [--seeds=0,1]

Each argument ``NAME=SET,PRUNING`` pairs a set's own quality with the masks found on it:
``SET`` is a distillation workdir (its ``summary.json``: the accuracy of fresh networks trained
on the set; ``#random`` takes its random-real-subset baseline instead) and ``PRUNING`` a pruning
workdir (``rounds.jsonl``; ``:LABEL`` picks the run label, default ``dp``). Writes
``quality.md`` (per set: set accuracy, the masks' accuracy at each sparsity as mean ± std over
seeds, and per sparsity the least-squares line through the sets and its correlation) and
``quality_vs_dp.png``.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from dp_jax.system import figures
from dp_jax.storage import fileio
from dp_jax.rundir import verified
from dp_jax.reports.curves import save_figure


def set_accuracy(spec: str) -> tuple[float, float]:
    """``(mean, std)`` accuracy of the set named by ``workdir[#random]``."""
    workdir, _, which = spec.partition("#")
    path = os.path.join(workdir, "summary.json")
    if not os.path.exists(path):
        raise ValueError(f"{workdir}: no summary.json (not a finished distillation workdir)")
    res = fileio.read_json(path).get("results", {}).get("random" if which == "random" else
                                                    "distilled")
    if which not in ("", "random") or not res:
        raise ValueError(f"{spec}: no {'random' if which else 'distilled'} result "
                         "(allowed suffix: #random)")
    return float(res["accuracy_mean"]), float(res.get("accuracy_std", 0.0))


def mask_accuracy(spec: str, sparsity: float, tol: float = 0.005,
                  seeds: Sequence[int] | None = None) -> np.ndarray:
    """Per-seed test accuracies of ``workdir[:label]``'s round at ``sparsity`` (± ``tol``),
    of ``seeds`` only if given."""
    workdir, _, label = spec.partition(":")
    path = os.path.join(workdir, "rounds.jsonl")
    if not os.path.exists(path):
        raise ValueError(f"{workdir}: no rounds.jsonl (not a pruning workdir)")
    rows = [r for r in verified.workdir_records(workdir) if r["method"] == (label or "dp")
            and abs(r["sparsity"] - sparsity) <= tol and (seeds is None or r["seed"] in seeds)]
    if not rows:
        raise ValueError(f"{spec}: no round of run '{label or 'dp'}' at sparsity {sparsity}")
    return np.array([r["test_accuracy"] for r in rows])


def fit(x: np.ndarray, y: np.ndarray) -> dict:
    """Least-squares line ``y = slope * x + intercept`` and Pearson's r (NaN for < 3 points)."""
    slope, intercept = np.polyfit(x, y, 1)
    r = float(np.corrcoef(x, y)[0, 1]) if len(x) >= 3 else float("nan")
    return {"slope": float(slope), "intercept": float(intercept), "r": r}


def collect(pairs: Sequence[str], sparsities: Sequence[float],
            seeds: Sequence[int] | None = None) -> list[dict]:
    """Every ``NAME=SET,PRUNING`` pair resolved (all validated before anything is written)."""
    out = []
    for p in pairs:
        name, _, rest = p.partition("=")
        set_spec, _, prune_spec = rest.partition(",")
        if not name or not set_spec or not prune_spec:
            raise ValueError(f"{p!r}: expected NAME=SET_WORKDIR[#random],PRUNE_WORKDIR[:LABEL]")
        out.append({"name": name, "set": set_accuracy(set_spec),
                    "masks": {s: mask_accuracy(prune_spec, s, seeds=seeds) for s in sparsities}})
    return out


def report(sets: list[dict], sparsities: Sequence[float]) -> tuple[str, dict]:
    """The markdown table and the fits per sparsity."""
    head = "| set | set accuracy | " + " | ".join(f"masks at {100 * s:.1f} %" for s in
                                                   sparsities) + " |"
    lines = [head, "|---" * (2 + len(sparsities)) + "|"]
    for s in sets:
        cells = [f"{100 * a.mean():.2f} ± {100 * (a.std(ddof=1) if a.size > 1 else 0):.2f} "
                 f"({a.size})" for a in s["masks"].values()]
        lines.append(f"| {s['name']} | {100 * s['set'][0]:.2f} ± {100 * s['set'][1]:.2f} | "
                     + " | ".join(cells) + " |")
    x = np.array([s["set"][0] for s in sets])
    fits = {sp: fit(x, np.array([s["masks"][sp].mean() for s in sets])) for sp in sparsities}
    lines.append("")
    for sp, f in fits.items():
        lines.append(f"- at {100 * sp:.1f} %: masks = {f['slope']:.3f} × set + "
                     f"{100 * f['intercept']:.2f} pts, r = {f['r']:.2f} over {len(sets)} sets")
    return "\n".join(lines) + "\n", fits


def plot(sets: list[dict], fits: dict, path: str) -> None:
    """Mask accuracy against set accuracy, one colour per sparsity, with the fitted lines."""
    fig, ax = figures.subplots(figsize=(6.4, 4.2))
    x = np.array([s["set"][0] for s in sets])
    for sp, f in fits.items():
        y = [100 * s["masks"][sp].mean() for s in sets]
        e = [100 * (s["masks"][sp].std(ddof=1) if s["masks"][sp].size > 1 else 0) for s in sets]
        line = ax.errorbar(100 * x, y, yerr=e, fmt="o", capsize=3, label=f"{100 * sp:.1f} %")
        xs = np.linspace(x.min(), x.max(), 2)
        ax.plot(100 * xs, 100 * (f["slope"] * xs + f["intercept"]), "--",
                color=line[0].get_color(), lw=1)
    for s, xi in zip(sets, x):
        ax.annotate(s["name"], (100 * xi, 100 * s["masks"][next(iter(fits))].mean()),
                    fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("accuracy of networks trained on the set, %")
    ax.set_ylabel("accuracy of the mask found on it, %")
    ax.set_title("set quality vs mask quality (dashed: least squares)")
    ax.grid(alpha=0.3)
    ax.legend(title="sparsity", fontsize=8)
    save_figure(fig, path)


def write(pairs: Sequence[str], sparsities: Sequence[float], seeds, out: str) -> str:
    """quality.md and the plot of ``pairs`` (``NAME=SET,PRUNING``) into ``out``; returns the
    text. A ValueError names what is wrong before anything is written."""
    sets = collect(pairs, sparsities, seeds)
    if len(sets) < 2:
        raise ValueError("a fit needs at least two sets")
    text, fits = report(sets, sparsities)
    os.makedirs(out, exist_ok=True)
    fileio.atomic_write_bytes(os.path.join(out, "quality.md"), text.encode())
    plot(sets, fits, os.path.join(out, "quality_vs_dp.png"))
    return text
