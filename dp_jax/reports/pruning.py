"""Tables and plots from run directories (reads rounds.jsonl, config.json, summary.json, masks).

  python -m dp_jax.report WORKDIR                       # rewrite report.md and plots/ of a run
  python -m dp_jax.report DIR1 DIR2 ... --out=MERGED    # one report over the seeds of several

Spread over seeds is the *sample* standard deviation (ddof=1) everywhere, with the number of
seeds stated (``mean ± std (n=3)``); a table of single-seed results shows no ± at all.
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Optional, Sequence

import numpy as np

from dp_jax.storage import fileio
from dp_jax.system import figures
from dp_jax import masks as masks_lib
from dp_jax import methods
from dp_jax.methods import dp as dp_method, imp as imp_method
from dp_jax.pruning import records
from dp_jax.rundir import paths as workdir_lib
from dp_jax.rundir import verified
from dp_jax.reports.merge import gather, merge_note
from dp_jax.reports.curves import save_figure
from dp_jax.reports import controls, curves

ANALYSIS_BEGIN, ANALYSIS_END = "<!-- analysis -->", "<!-- /analysis -->"
pretty = methods.pretty  # a run label's name in tables and plots, from the method registry


def sample_std(values) -> Optional[float]:
    """Sample standard deviation (ddof=1); None for fewer than two values (undefined)."""
    v = np.asarray(values, dtype=float)
    return float(v.std(ddof=1)) if v.size > 1 else None


def mean_std(mean: float, std: Optional[float], n: int, *, scale: float = 1.0,
             digits: int = 2, show_n: bool = True) -> str:
    """``'97.12 ± 0.31 (n=3)'``; a single value shows no ± (``'97.12 (n=1)'``)."""
    text = f"{scale * mean:.{digits}f}"
    if std is not None:
        text += f" ± {scale * std:.{digits}f}"
    return text + (f" (n={n})" if show_n else "")


def aggregate(rows: list[dict]) -> dict[str, list[dict]]:
    """Per method, per round: seed-mean sparsity, accuracy (and sample std), examples, time."""
    groups = defaultdict(list)
    for r in records.evaluated(rows):  # rounds prune.evaluate skipped have no accuracy
        groups[(r["method"], r["round"])].append(r)
    out = defaultdict(list)
    for (method, rnd), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        acc = [r["test_accuracy"] for r in rs]
        out[method].append({
            "round": rnd, "n": len(rs), "seeds": sorted(r["seed"] for r in rs),
            "sparsity": float(np.mean([r["sparsity"] for r in rs])),
            "acc_mean": float(np.mean(acc)), "acc_std": sample_std(acc),
            "train_examples": float(np.mean([r["train_examples"] for r in rs])),
            "wall_s": float(np.mean([r["wall_s"] for r in rs])),
        })
    return dict(out)


def final_figures(rows: list[dict]) -> dict[str, dict]:
    """Per method, its last round's aggregate (``sparsity``, ``acc_mean``, ``acc_std``, ``n``)."""
    return {m: max(rs, key=lambda a: a["round"]) for m, rs in sorted(aggregate(rows).items())}


def accuracy_table(agg: dict[str, list[dict]]) -> str:
    """Markdown table: one row per round, one column per method (mean ± sample std, %).

    Every cell states its number of seeds; when every cell has one seed the header says so
    instead and no cell shows a ±.
    """
    methods = sorted(agg)
    rounds = sorted({a["round"] for rows in agg.values() for a in rows})
    single = all(a["n"] == 1 for rows in agg.values() for a in rows)
    head = "| round | sparsity | " + " | ".join(
        pretty(m) + (" (n=1)" if single else "") for m in methods) + " |"
    lines = [head, "|---|---|" + "---|" * len(methods)]
    for rnd in rounds:
        cells, sp = [], None
        for m in methods:
            a = next((a for a in agg[m] if a["round"] == rnd), None)
            if a is None:
                cells.append("")
                continue
            sp = a["sparsity"]
            cells.append(mean_std(a["acc_mean"], a["acc_std"], a["n"], scale=100,
                                  show_n=not single))
        lines.append(f"| {rnd} | {100 * (sp or 0):.1f}% | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _figure():
    return figures.subplots(figsize=(7, 4.5))


def _finish(fig, ax, xlabel: str, title: str):
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    return fig


def plot_accuracy_vs_sparsity(agg: dict[str, list[dict]], path: str, title: str = "") -> None:
    """Write :func:`figure_accuracy_vs_sparsity` to ``path``."""
    save_figure(figure_accuracy_vs_sparsity(agg, title), path, dpi=120)


def plot_accuracy_vs_examples(agg: dict[str, list[dict]], path: str) -> None:
    """Write :func:`figure_accuracy_vs_examples` to ``path``."""
    save_figure(figure_accuracy_vs_examples(agg), path, dpi=120)


def figure_accuracy_vs_sparsity(agg: dict[str, list[dict]], title: str = ""):
    """Test accuracy vs fraction of weights remaining (log axis), ± sample-std bands (n > 1);
    a matplotlib figure (``agg``: :func:`aggregate`)."""
    fig, ax = _figure()
    for m in sorted(agg):
        rows = agg[m]
        remaining = np.array([100 * (1 - a["sparsity"]) for a in rows])
        mean = np.array([100 * a["acc_mean"] for a in rows])
        std = np.array([np.nan if a["acc_std"] is None else 100 * a["acc_std"] for a in rows])
        ax.plot(remaining, mean, marker="o", ms=3, label=pretty(m))
        if np.isfinite(std).any():  # single-seed points have no spread to draw
            ax.fill_between(remaining, mean - std, mean + std, alpha=0.2)
    ax.invert_xaxis()
    return _finish(fig, ax, "weights remaining (%)", title or "Accuracy vs sparsity")


def figure_accuracy_vs_examples(agg: dict[str, list[dict]]):
    """Test accuracy vs examples processed by the mask search (log axis); a figure."""
    fig, ax = _figure()
    for m in sorted(agg):
        rows = [a for a in agg[m] if a["train_examples"] > 0]
        if rows:
            ax.plot([a["train_examples"] for a in rows], [100 * a["acc_mean"] for a in rows],
                    marker="o", ms=3, label=pretty(m))
    return _finish(fig, ax, "examples processed by the mask search (cumulative)",
                   "Cost of finding each mask")


def ticket_sparsity(agg: dict[str, list[dict]], tolerance: float = 0.01) -> dict[str, float]:
    """Per method: the highest sparsity whose mean accuracy is within ``tolerance`` of dense."""
    out = {}
    for m, rows in agg.items():
        dense = next((a["acc_mean"] for a in rows if a["round"] == 0), None)
        if dense is None:
            continue
        ok = [a["sparsity"] for a in rows if a["acc_mean"] >= dense - tolerance]
        out[m] = max(ok) if ok else 0.0
    return out


def stall_notes(agg: dict[str, list[dict]]) -> list[str]:
    """A warning per method whose later rounds pruned nothing (the schedule stalled)."""
    notes = []
    for m in sorted(agg):
        same = [b["round"] for a, b in zip(agg[m], agg[m][1:]) if b["sparsity"] == a["sparsity"]]
        if same:
            notes += [f"**Warning:** {pretty(m)}: rounds {same[0]}-{same[-1]} pruned nothing "
                      f"(sparsity stays {100 * agg[m][-1]['sparsity']:.2f}%): the schedule "
                      "stalled (prune.fraction too large for prune.rounds, or prune.min_per_layer "
                      "holds every layer), so those rounds repeat one mask.", ""]
    return notes


def _load_masks(workdirs) -> dict[tuple[str, int], dict[int, dict]]:
    """{(label, seed): {round: mask}} of every run with saved masks, each checked
    (:mod:`dp_jax.rundir.verified`): the rounds of the run's records, or, for a run without
    records (made before runs kept their own), the mask files it holds.

    ``workdirs`` is one directory or a sequence; a run held by several comes from the first.
    """
    out = {}
    for workdir in [workdirs] if isinstance(workdirs, str) else workdirs:
        for label, seed in workdir_lib.list_runs(workdir):
            if (label, seed) in out:
                continue
            done = sorted({r["round"] for r in verified.run_records(workdir, label, seed)}
                          or workdir_lib.list_masks(workdir, label, seed))
            rounds = {rnd: masks_lib.from_flat(verified.mask_arrays(workdir, label, seed, rnd))
                      for rnd in done}
            if rounds:
                out[(label, seed)] = rounds
    return out


def mask_agreement(workdirs, a: str, b: str) -> list[dict]:
    """Per round, mean over seeds of the Hamming distance and IoU between runs ``a`` and ``b``."""
    masks = _load_masks(workdirs)
    seeds = sorted({s for (lab, s) in masks if lab == a} & {s for (lab, s) in masks if lab == b})
    per_round = defaultdict(list)
    for s in seeds:
        ma, mb = masks[(a, s)], masks[(b, s)]
        for rnd in sorted(set(ma) & set(mb)):
            d = masks_lib.hamming(ma[rnd], mb[rnd])
            per_round[rnd].append((d["hamming"], d["iou"]))
    return [{"round": r, "hamming": float(np.mean([h for h, _ in v])),
             "iou": float(np.mean([i for _, i in v])), "n": len(v)}
            for r, v in sorted(per_round.items())]


def layer_sparsity_table(workdirs) -> str:
    """Markdown: per method, per prunable layer, sparsity of the last round (seed-mean)."""
    masks = _load_masks(workdirs)
    final = defaultdict(list)
    for (label, _), rounds in masks.items():
        if rounds:
            last = rounds[max(rounds)]
            final[label].append(masks_lib.layer_sparsity(last))
    if not final:
        return ""
    layers = sorted({k for rows in final.values() for r in rows for k in r})
    lines = ["| method | " + " | ".join(layers) + " |", "|---|" + "---|" * len(layers)]
    for label in sorted(final):
        cells = [f"{100 * np.mean([r[k] for r in final[label]]):.1f}%" for k in layers]
        lines.append(f"| {pretty(label)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def base_methods(rows: list[dict]) -> dict[str, str]:
    """``{run label: registered method name}`` from the records (``base_method``)."""
    return {r["method"]: r.get("base_method", r["method"]) for r in rows}


def cost_section(summary: dict, agg: dict[str, list[dict]], base: dict[str, str]) -> list[str]:
    """Markdown lines comparing the mask-search cost of IMP and DP (with and without distillation).

    ``base`` maps run labels to their method (:func:`base_methods`)."""
    methods = summary.get("methods", {})
    imp = [m for m in methods if base.get(m) == imp_method.METHOD.name]
    dp = next((m for m in sorted(methods) if base.get(m) == dp_method.METHOD.name), None)
    parts = ["## Cost of the mask search", "",
             "`train_examples` counts the examples processed to *find* each round's mask (the "
             "trainings of rounds 0..r-1 for IMP, the inner loops on the distilled set for DP); "
             "evaluation training is not counted.", "",
             "| method | final sparsity | examples processed by the mask search | "
             "search wall time (s) | run wall time (s) | of which compiling (s) |",
             "|---|---|---|---|---|---|"]
    for m, s in sorted(methods.items()):
        parts.append(f"| {pretty(m)} | {100 * s['final_sparsity']:.1f}% | "
                     f"{s['mask_search_examples']:,} | {s.get('search_wall_s', 0):.0f} | "
                     f"{s['wall_s']:.0f} | {s.get('compile_s', 0):.0f} |")
    parts += _subset_note(agg, base, dp)
    phases = summary.get("phases_s", {})
    if dp and imp:
        d = methods[dp]
        distill_examples = phases.get("distill_examples", 0) + phases.get("expert_examples", 0)
        distill_wall = phases.get("distill_wall_s", 0.0) + phases.get("expert_wall_s", 0.0)
        d_wall = max(d.get("search_wall_s", 0), 1e-9)
        parts += ["", "| ratio | examples | wall time of the search |", "|---|---|---|"]
        for m in imp:
            i = methods[m]
            ex = i["mask_search_examples"] / max(d["mask_search_examples"], 1)
            ex_all = i["mask_search_examples"] / max(d["mask_search_examples"] + distill_examples, 1)
            i_wall = i.get("search_wall_s", 0)
            parts.append(f"| {pretty(m)} / DP | {ex:,.1f}x | {i_wall / d_wall:,.1f}x |")
            parts.append(f"| {pretty(m)} / (DP + distillation + experts) | {ex_all:,.2f}x | "
                         f"{i_wall / max(d_wall + distill_wall, 1e-9):,.2f}x |")
        parts += ["", f"Distillation: {round(phases.get('distill_examples', 0)):,} examples, "
                  f"{phases.get('distill_wall_s', 0):.0f} s; experts: "
                  f"{round(phases.get('expert_examples', 0)):,} examples, "
                  f"{phases.get('expert_wall_s', 0):.0f} s."]
    parts += ["", f"Total wall time: {summary.get('wall_s', 0):.0f} s on "
              f"{summary.get('backend', '?')}.", ""]
    return parts


def _subset_note(agg: dict[str, list[dict]], base: dict[str, str], dp) -> list[str]:
    """The cost table's note on the real-subset control: below ``dp.batch_size`` images its
    batches are smaller than DP's, so the same steps process fewer examples."""
    subsets = sorted(m for m in agg if base.get(m) == "subset")
    if not subsets:
        return []

    def per_round(m):  # the last round's own search (round 1 also pays a coreset's probes)
        te = [a["train_examples"] for a in agg[m]]
        return te[-1] - te[-2] if len(te) > 1 else 0
    note = ("Note: the real-subset control runs DP's inner loop on its N images; with N below "
            "`dp.batch_size` every batch is the whole subset, so the same steps process fewer "
            "examples than DP's (steps x N instead of steps x `dp.batch_size`). Coreset "
            "selections (`select=`) add their probe trainings to round 1.")
    if dp in agg:
        note += " Examples per round: " + ", ".join(
            f"{pretty(m)} {per_round(m):,.0f}" for m in subsets + [dp]) + "."
    return ["", note]


def write_report(workdir: str, sources: Optional[Sequence[str]] = None) -> str:
    """Write report.md and plots/*.png into ``workdir``; returns the report text.

    ``sources`` (default ``[workdir]``): the workdirs whose results are reported, merged
    when several (:func:`gather`); ``workdir`` is then only where the report goes.
    """
    sources = list(sources or [workdir])
    if len(sources) > 1 and os.path.abspath(workdir) in map(os.path.abspath, sources):
        raise ValueError(f"--out={workdir} is one of the merged workdirs; its own report "
                         "would be replaced: choose another directory")
    g = gather(sources)
    cfg, summary, agg = g["config"], g["summary"], aggregate(g["rows"])
    title = f"{cfg.get('model', {}).get('name', '')} on {cfg.get('data', {}).get('name', '')}"
    plot_accuracy_vs_sparsity(agg, workdir_lib.plot_path(workdir, "accuracy_vs_sparsity.png"), title)
    single = all(a["n"] == 1 for rows in agg.values() for a in rows)
    spread = ("one seed (n=1), so no spread is shown" if single else
              "mean ± sample std (ddof=1) over the n seeds of each cell")
    parts = [f"# Pruning report: {title}", ""] + merge_note(g) + [
             "Test accuracy (%) of each round's mask, trained on the real training set; "
             f"{spread}.", "", accuracy_table(agg), "",
             "![accuracy vs sparsity](plots/accuracy_vs_sparsity.png)", ""] + stall_notes(agg)
    skipped = sorted({pretty(r["method"]) for r in g["rows"] if r.get("test_accuracy") is None})
    if skipped:
        parts += ["Blank cells of " + ", ".join(skipped) + ": rounds whose masks were made but "
                  "not trained (`prune.evaluate`); the sparsity below counts trained rounds.", ""]
    tickets = ticket_sparsity(agg)
    parts += ["Highest sparsity whose accuracy is within 1 point of the dense network: " +
              ", ".join(f"{pretty(m)} {100 * s:.1f}%" for m, s in sorted(tickets.items())), ""]
    if summary.get("methods"):
        parts += cost_section(summary, agg, base_methods(g["rows"]))
        plot_accuracy_vs_examples(agg, workdir_lib.plot_path(workdir, "accuracy_vs_examples.png"))
        parts += ["![accuracy vs examples](plots/accuracy_vs_examples.png)", ""]
    parts += controls.controls_section(g["rows"], workdir_lib.plot_path(workdir, "controls.png"))
    parts += _curve_sections(workdir, sources)
    parts += _mask_sections(sources, sorted(agg), base_methods(g["rows"]))
    text = "\n".join(parts)
    path = workdir_lib.report_path(workdir)
    if os.path.exists(path):  # keep the block written by `python -m dp_jax.analysis`
        old = open(path).read()
        start, end = old.find(ANALYSIS_BEGIN), old.find(ANALYSIS_END)
        if 0 <= start < end:
            text += "\n" + old[start:end + len(ANALYSIS_END)] + "\n"
    fileio.atomic_write_bytes(path, text.encode())
    return text


def _curve_sections(workdir: str, sources: list[str]) -> list[str]:
    """Training curves and the distillation loss, from the sources' metrics.jsonl."""
    rows, parts = curves.metric_rows(sources), []
    if curves.plot_training_curves(rows, workdir_lib.plot_path(workdir, "training_curves.png"),
                                   pretty=pretty):
        parts += ["## Training curves", "", "Training loss per epoch of each round's training "
                  "(mean over seeds; darker lines are later rounds). Every scalar is also in "
                  "TensorBoard: `tensorboard --logdir " + ", ".join(
                      workdir_lib.tensorboard_dir(d) for d in sources) + "`.", "",
                  "![training curves](plots/training_curves.png)", ""]
    if curves.plot_distillation(rows, workdir_lib.plot_path(workdir, "distillation_loss.png")):
        parts += ["## Distillation", "", "Matching loss per iteration of the distillation "
                  "(and the periodic evaluation's accuracy, when enabled).", "",
                  "![distillation loss](plots/distillation_loss.png)", ""]
    return parts


def _mask_sections(sources: list[str], labels: list[str], base: dict[str, str]) -> list[str]:
    """The mask-agreement (runs searching on a distilled set vs IMP) and per-layer sparsity
    sections."""
    parts = []
    distilled = [a for a in labels if base.get(a) in methods.REGISTRY
                 and methods.get(base[a]).needs_distilled]
    pairs = [(a, b) for a in distilled for b in labels if base.get(b) == imp_method.METHOD.name]
    if pairs:
        parts += ["## Mask agreement", "", "Hamming distance (fraction of prunable weights on "
                  "which the masks differ) and IoU of the kept weights, mean over seeds.", "",
                  "| round | " + " | ".join(f"{pretty(a)} vs {pretty(b)}" for a, b in pairs) + " |",
                  "|---|" + "---|" * len(pairs)]
        tables = [{r["round"]: r for r in mask_agreement(sources, a, b)} for a, b in pairs]
        for rnd in sorted(set().union(*[t.keys() for t in tables])):
            cells = [f"{t[rnd]['hamming']:.3f} / {t[rnd]['iou']:.3f}" if rnd in t else ""
                     for t in tables]
            parts.append(f"| {rnd} | " + " | ".join(cells) + " |")
        parts.append("")
    table = layer_sparsity_table(sources)
    if table:
        parts += ["## Per-layer sparsity of the last round", "", table, ""]
    return parts

