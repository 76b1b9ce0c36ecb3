"""The analysis section of report.md and the aggregate plots, from ``workdir/analysis/*.json``.

Everything is read back from disk, so analyses run in several invocations (say
``--runs=imp_k0`` then ``--runs=random``) end up in one report. The section
lives between ``<!-- analysis -->`` and ``<!-- /analysis -->``; the rest of
report.md is left untouched.

Each analysis shows itself through a :class:`Section` registered under its name in
:data:`SECTIONS` (:func:`register`): the glob of its per-mask JSON files, a function drawing
its plots and one returning its markdown. The report takes them in the order of
:data:`dp_jax.analysis.registry.ANALYSES`, after a summary over seeds.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from typing import Callable

import numpy as np

from dp_jax.analysis import registry as analyses
from dp_jax.storage import fileio
from dp_jax.rundir import paths as workdir_lib
from dp_jax.rundir import verified
from dp_jax.reports import analysis_plots as plots
from dp_jax.reports.pruning import ANALYSIS_BEGIN as BEGIN
from dp_jax.reports.pruning import ANALYSIS_END as END
from dp_jax.reports.pruning import pretty


def _load(workdir: str, pattern: str) -> list[dict]:
    """The analysis results matching ``pattern``, each checked against the analysis manifest."""
    return [verified.analysis_json(workdir, os.path.basename(p))
            for p in sorted(glob.glob(workdir_lib.analysis_path(workdir, pattern)))]


def _key(r):
    return (r["run"], r["seed"], r["round"])


def replace_section(text: str, section: str) -> str:
    """``text`` with the marked analysis section replaced by ``section`` (appended if absent)."""
    block = f"{BEGIN}\n{section.rstrip()}\n{END}"
    pat = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if pat.search(text):
        return pat.sub(lambda _: block, text, count=1)
    return (text.rstrip() + "\n\n" if text.strip() else "") + block + "\n"


def _instability_section(workdir, rows, curves, masks) -> list[str]:
    out = ["### Instability (linear mode connectivity)", "",
           "Copies of each mask trained from the mask's starting point with different data "
           "order (copy 0 uses the run's own data order), then evaluated on the whole path "
           "(1 - alpha) theta_1 + alpha theta_2. Error barrier = max_alpha err(alpha) - "
           "(err(0) + err(1)) / 2 (mean over pairs of copies); stable if below 2 percentage "
           f"points. BatchNorm statistics: {rows[0]['bn_mode'] if rows else 'n/a'}.", "",
           "| run | seed | round | sparsity | error barrier (pp) | loss barrier | copies' test "
           "error (%) | recorded test error (%) | relative L2 distance | stable |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=_key):
        rec = r.get("record_test_accuracy")
        rec = f"{100 * (1 - rec):.2f}" if rec is not None else ""
        errs = ", ".join(f"{100 * e:.2f}" for e in r["copy_test_error"])
        out.append(f"| {pretty(r['run'])} | {r['seed']} | {r['round']} | "
                   f"{100 * r['sparsity']:.1f}% | {100 * r['barrier']:.2f} | "
                   f"{r['loss_barrier']:.4f} | {errs} | {rec} | "
                   f"{r['l2_distance'][0]['relative']:.3f} | {'yes' if r['stable'] else 'no'} |")
    out += ["", "![barrier vs sparsity](plots/instability_barrier.png)", "",
            "![interpolation curves](plots/instability_curves.png)", ""]
    if any("bn_modes" in r for r in rows):
        out += ["Error barrier (pp) by BatchNorm treatment:", "",
                "| run | seed | round | " + " | ".join(rows[0]["bn_modes"]) + " |",
                "|---|---|---|" + "---|" * len(rows[0]["bn_modes"])]
        for r in sorted(rows, key=_key):
            cells = " | ".join(f"{100 * v['barrier']:.2f}" for v in r["bn_modes"].values())
            out.append(f"| {pretty(r['run'])} | {r['seed']} | {r['round']} | {cells} |")
        out.append("")
    lw = [r for r in rows if r.get("layerwise")]
    if lw:
        layers = list(lw[0]["layerwise"])
        out += ["Layer-wise error barriers (pp; one layer interpolated, the rest at copy 0):", "",
                "| run | seed | round | " + " | ".join(layers) + " |",
                "|---|---|---|" + "---|" * len(layers)]
        for r in sorted(lw, key=_key):
            cells = " | ".join(f"{100 * r['layerwise'][k]['barrier']:.2f}" for k in layers
                               if k in r["layerwise"])
            out.append(f"| {pretty(r['run'])} | {r['seed']} | {r['round']} | {cells} |")
        out.append("")
    if curves:
        out += ["Dense network started from its weights at step k (k = 0: init):", "",
                "| seed | " + " | ".join(f"k={k}" for k in curves[0]["k"]) + " |",
                "|---|" + "---|" * len(curves[0]["k"])]
        for c in curves:
            out.append(f"| {c['seed']} | " + " | ".join(f"{100 * b:.2f}" for b in c["barrier"])
                       + " |")
        out += ["", "![dense instability vs k](plots/instability_dense_k.png)", ""]
    if masks and masks.get("pairs"):
        out += ["Mask distances between methods (prunable weights):", "",
                "| seed | round | runs | Hamming | IoU of kept weights |", "|---|---|---|---|---|"]
        for p in masks["pairs"]:
            out.append(f"| {p['seed']} | {p['round']} | {pretty(p['runs'][0])} vs "
                       f"{pretty(p['runs'][1])} | {p['hamming']:.4f} | {p['iou']:.4f} |")
        out.append("")
    return out


def _hessian_section(rows) -> list[str]:
    if not rows:
        return []
    k = len(rows[0]["top_eigenvalues"])
    out = ["### Hessian of the training loss (unpruned subspace)", "",
           f"At the trained copy 0, in eval mode at fixed BatchNorm statistics, on "
           f"{rows[0]['num_examples']} training examples: top {k} eigenvalues by Lanczos "
           f"({rows[0]['lanczos_steps']} steps, full re-orthogonalisation), trace by Hutchinson "
           f"({rows[0]['num_probes']} Rademacher probes), density by stochastic Lanczos "
           "quadrature.", "",
           "| run | seed | round | sparsity | top eigenvalues | trace ± s.e. | train loss |",
           "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=_key):
        eig = ", ".join(f"{e:.4g}" for e in r["top_eigenvalues"])
        out.append(f"| {pretty(r['run'])} | {r['seed']} | {r['round']} | "
                   f"{100 * r['sparsity']:.1f}% | {eig} | {r['trace']:.4g} ± "
                   f"{r['trace_stderr']:.2g} | {r['loss']:.4f} |")
    out += ["", "![Hessian vs sparsity](plots/hessian.png)", "",
            "![Hessian spectral density](plots/hessian_density.png)", ""]
    return out


def _landscape_section(rows) -> list[str]:
    if not rows:
        return []
    out = ["### Loss landscapes", "",
           f"On {rows[0]['num_examples']} test examples: interpolation copy 0 -> copy 1, the "
           "plane through three copies, and filter-normalised random directions around copy 0 "
           "(pruned weights stay zero along every direction; directions saved as npz).", "",
           "| run | seed | round | sparsity | centre loss | mean loss rise, random 2-D | "
           "loss rise at t = ±span, random 1-D | figure |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=_key):
        s = r["sharpness"]
        stem = workdir_lib.analysis_stem(r['run'], r['seed'], r['round'])
        out.append(f"| {pretty(r['run'])} | {r['seed']} | {r['round']} | "
                   f"{100 * r['sparsity']:.1f}% | {s['center_loss']:.4f} | "
                   f"{s['mean_loss_increase_2d']:.4f} | {s['loss_increase_1d_at_span']:.4f} | "
                   f"[png](plots/landscape_{stem}.png) |")
    out.append("")
    return out


STABLE_PP = 2.0  # error barrier (percentage points) below which a mask counts as stable


def aggregate(rows: list[dict]) -> list[dict]:
    """Mean and std over seeds of :func:`summary_rows` per (run, round).

    Returns one dict per (run, round): ``run, round, sparsity, seeds`` and, where present,
    ``barrier_mean/std`` (fractions), ``stable`` (seeds with barrier < 2 pp),
    ``loss_barrier_mean/std``, ``top_eigenvalue_mean/std``, ``trace_mean/std`` (population
    std, ``ddof=0``).
    """
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["run"], r["round"]), []).append(r)
    out = []
    for (run, rnd), rs in sorted(groups.items()):
        a = {"run": run, "round": rnd, "sparsity": float(np.mean([r["sparsity"] for r in rs])),
             "seeds": sorted(r["seed"] for r in rs)}
        for f in ("barrier", "loss_barrier", "top_eigenvalue", "trace"):
            v = [r[f] for r in rs if f in r]
            if v:
                a[f + "_mean"], a[f + "_std"] = float(np.mean(v)), float(np.std(v))
                a[f + "_n"] = len(v)
        if "barrier_mean" in a:
            a["stable"] = sum(r["barrier"] < STABLE_PP / 100 for r in rs if "barrier" in r)
        out.append(a)
    return out


def _summary_section(workdir) -> list[str]:
    agg = aggregate(summary_rows(workdir))
    if not agg:
        return []

    def ms(a, f, scale=1.0, fmt="{:.2f}"):
        if f + "_mean" not in a:
            return ""
        return (fmt.format(scale * a[f + "_mean"]) + " ± " + fmt.format(scale * a[f + "_std"])
                + f" (n={a[f + '_n']})")
    out = ["### Summary over seeds", "",
           "Mean ± std over the seeds analysed; stable = seeds whose error barrier is below "
           f"{STABLE_PP:g} percentage points.", "",
           "| run | round | sparsity | error barrier (pp) | stable | loss barrier | top Hessian "
           "eigenvalue | Hessian trace |", "|---|---|---|---|---|---|---|---|"]
    for a in agg:
        stable = f"{a['stable']}/{a['barrier_n']}" if "stable" in a else ""
        out.append(f"| {pretty(a['run'])} | {a['round']} | {100 * a['sparsity']:.1f}% | "
                   f"{ms(a, 'barrier', 100)} | {stable} | {ms(a, 'loss_barrier', 1, '{:.3f}')} | "
                   f"{ms(a, 'top_eigenvalue', 1, '{:.4g}')} | {ms(a, 'trace', 1, '{:.4g}')} |")
    return out + [""]


def _curves(workdir: str) -> list[dict]:
    return _load(workdir, "instability_dense_k_seed*.json")


def _instability_plots(workdir: str, rows: list[dict], pdir: str) -> None:
    curves = _curves(workdir)
    if rows:
        plots.barrier_vs_sparsity(rows, os.path.join(pdir, "instability_barrier.png"))
        plots.interpolation_curves(rows, os.path.join(pdir, "instability_curves.png"))
    if curves:
        plots.rewind_curves(curves, os.path.join(pdir, "instability_dense_k.png"))


def _instability_lines(workdir: str, rows: list[dict]) -> list[str]:
    curves = _curves(workdir)
    if not (rows or curves):
        return []
    mpath = workdir_lib.analysis_path(workdir, "masks.json")
    masks = verified.analysis_json(workdir, "masks.json") if os.path.exists(mpath) else None
    return _instability_section(workdir, rows, curves, masks)


def _hessian_plots(workdir: str, rows: list[dict], pdir: str) -> None:
    if rows:
        plots.hessian_vs_sparsity(rows, os.path.join(pdir, "hessian.png"))
        plots.hessian_density(rows, os.path.join(pdir, "hessian_density.png"))


def _landscape_plots(workdir: str, rows: list[dict], pdir: str) -> None:
    for r in rows:
        stem = workdir_lib.analysis_stem(r['run'], r['seed'], r['round'])
        plots.landscape(r, os.path.join(pdir, f"landscape_{stem}.png"))


@dataclasses.dataclass(frozen=True)
class Section:
    """How the report shows one analysis.

    ``pattern``: glob of its per-mask JSON files under ``analysis/`` (files without a ``run``
    field, such as summaries, are left out of the rows); ``plots(workdir, rows, plot_dir)``
    draws its figures; ``lines(workdir, rows)`` returns its markdown ([] to show nothing).
    """
    pattern: str
    plots: Callable[[str, list[dict], str], None]
    lines: Callable[[str, list[dict]], list[str]]


SECTIONS: dict[str, Section] = {}


def register(name: str, section: Section) -> Section:
    """Show the registered analysis ``name`` with ``section``; a name that already has a
    section, or that is no registered analysis, is refused."""
    if name in SECTIONS:
        raise ValueError(f"analysis {name!r} already has a report section")
    analyses.get(name)  # a section for an unknown analysis would never be shown
    SECTIONS[name] = section
    return section


register("instability", Section("instability_*.json", _instability_plots, _instability_lines))
register("hessian", Section("hessian_*.json", _hessian_plots,
                            lambda workdir, rows: _hessian_section(rows)))
register("landscape", Section("landscape_*.json", _landscape_plots,
                              lambda workdir, rows: _landscape_section(rows)))


def write(workdir: str) -> str:
    """Redraw the plots and rewrite the analysis section of report.md: a summary over seeds,
    then the section of every registered analysis that has one.

    Returns:
      The section's markdown.
    """
    pdir = os.path.dirname(workdir_lib.plot_path(workdir, "x"))
    lines = ["## Analyses", "",
             "Written by `python -m dp_jax.analysis`; numbers in `analysis/*.json` "
             "(see docs/analysis.md).", ""]
    lines += _summary_section(workdir)
    for name in analyses.ANALYSES:
        entry = SECTIONS.get(name)
        if entry is None:
            continue
        rows = [r for r in _load(workdir, entry.pattern) if "run" in r]
        entry.plots(workdir, rows, pdir)
        lines += entry.lines(workdir, rows)
    section = "\n".join(lines)
    path = workdir_lib.report_path(workdir)
    old = open(path).read() if os.path.exists(path) else ""
    fileio.atomic_write_bytes(path, replace_section(old, section).encode())
    return section


def summary_rows(workdir: str) -> list[dict]:
    """Compact per-mask numbers (for scripts): barrier, loss barrier, top eigenvalue, trace."""
    rows = {}
    for r in _load(workdir, "instability_*.json"):
        if "run" in r:
            rows.setdefault(_key(r), dict(zip(("run", "seed", "round"), _key(r)),
                                          sparsity=r["sparsity"])).update(
                barrier=r["barrier"], loss_barrier=r["loss_barrier"])
    for r in _load(workdir, "hessian_*.json"):
        rows.setdefault(_key(r), dict(zip(("run", "seed", "round"), _key(r)),
                                      sparsity=r["sparsity"])).update(
            top_eigenvalue=r["top_eigenvalues"][0], trace=r["trace"])
    return [rows[k] for k in sorted(rows)]

