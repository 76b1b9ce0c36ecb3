"""Tables and plots from a run directory (reads rounds.jsonl and summary.json only).

  python -m dp_jax.report WORKDIR     # rewrite report.md and plots/ of a finished run
"""

from __future__ import annotations

import os
import sys
from collections import defaultdict

import numpy as np

from dp_jax import io
from dp_jax import methods
from dp_jax import workdir as workdir_lib

ANALYSIS_BEGIN, ANALYSIS_END = "<!-- analysis -->", "<!-- /analysis -->"
pretty = methods.pretty  # a run label's name in tables and plots, from the method registry


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
    _save(fig, path)


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


def _load_masks(workdir: str) -> dict[tuple[str, int], dict[int, dict]]:
    """{(label, seed): {round: {path: bool array}}} for every run with saved masks."""
    out = {}
    for label, seed in workdir_lib.list_runs(workdir):
        rounds = {}
        for rnd, path in workdir_lib.list_masks(workdir, label, seed).items():
            with np.load(path, allow_pickle=False) as z:
                rounds[rnd] = {k: z[k] for k in z.files}
        if rounds:
            out[(label, seed)] = rounds
    return out


def _prunable(mask: dict) -> dict:
    # Prunable leaves are the kernels; other leaves are all-True by construction.
    return {k: v for k, v in mask.items() if k.endswith("kernel") and v.ndim >= 2}


def mask_agreement(workdir: str, a: str, b: str) -> list[dict]:
    """Per round, mean over seeds of the Hamming distance and IoU between runs ``a`` and ``b``."""
    masks = _load_masks(workdir)
    seeds = sorted({s for (lab, s) in masks if lab == a} & {s for (lab, s) in masks if lab == b})
    per_round = defaultdict(list)
    for s in seeds:
        ma, mb = masks[(a, s)], masks[(b, s)]
        for rnd in sorted(set(ma) & set(mb)):
            ka, kb = _prunable(ma[rnd]), _prunable(mb[rnd])
            x = np.concatenate([ka[k].reshape(-1) for k in sorted(ka)])
            y = np.concatenate([kb[k].reshape(-1) for k in sorted(kb)])
            union = np.logical_or(x, y).sum()
            per_round[rnd].append((float(np.mean(x != y)),
                                   float(np.logical_and(x, y).sum() / union) if union else 1.0))
    return [{"round": r, "hamming": float(np.mean([h for h, _ in v])),
             "iou": float(np.mean([i for _, i in v])), "n": len(v)}
            for r, v in sorted(per_round.items())]


def layer_sparsity_table(workdir: str) -> str:
    """Markdown: per method, per prunable layer, sparsity of the last round (seed-mean)."""
    masks = _load_masks(workdir)
    final = defaultdict(list)
    for (label, _), rounds in masks.items():
        if rounds:
            last = rounds[max(rounds)]
            final[label].append({k: 1.0 - float(v.mean()) for k, v in _prunable(last).items()})
    if not final:
        return ""
    layers = sorted({k for rows in final.values() for r in rows for k in r})
    lines = ["| method | " + " | ".join(layers) + " |", "|---|" + "---|" * len(layers)]
    for label in sorted(final):
        cells = [f"{100 * np.mean([r[k] for r in final[label]]):.1f}%" for k in layers]
        lines.append(f"| {pretty(label)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_accuracy_vs_examples(agg: dict[str, list[dict]], path: str) -> None:
    """Test accuracy vs examples processed by the mask search (log axis)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in sorted(agg):
        rows = [a for a in agg[m] if a["train_examples"] > 0]
        if rows:
            ax.plot([a["train_examples"] for a in rows], [100 * a["acc_mean"] for a in rows],
                    marker="o", ms=3, label=pretty(m))
    ax.set_xscale("log")
    ax.set_xlabel("examples processed by the mask search (cumulative)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Cost of finding each mask")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: str) -> None:
    import matplotlib.pyplot as plt
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def cost_section(summary: dict, agg: dict[str, list[dict]]) -> list[str]:
    """Markdown lines comparing the mask-search cost of IMP and DP (with and without distillation)."""
    methods = summary.get("methods", {})
    imp = [m for m in methods if m.startswith("imp_k")]
    dp = "dp" if "dp" in methods else None
    parts = ["## Cost of the mask search", "",
             "`train_examples` counts the examples processed to *find* each round's mask (the "
             "trainings of rounds 0..r-1 for IMP, the inner loops on the distilled set for DP); "
             "evaluation training is not counted.", "",
             "| method | final sparsity | examples processed by the mask search | "
             "search wall time (s) | run wall time (s) |",
             "|---|---|---|---|---|"]
    for m, s in sorted(methods.items()):
        parts.append(f"| {pretty(m)} | {100 * s['final_sparsity']:.1f}% | "
                     f"{s['mask_search_examples']:,} | {s.get('search_wall_s', 0):.0f} | "
                     f"{s['wall_s']:.0f} |")
    phases = summary.get("phases_s", {})
    if dp and imp:
        d = methods[dp]
        distill_examples = phases.get("distill_examples", 0) + phases.get("expert_examples", 0)
        distill_wall = phases.get("distill_wall_s", 0.0) + phases.get("expert_wall_s", 0.0)
        parts += ["", "| ratio | examples | wall time of the search |", "|---|---|---|"]
        for m in imp:
            i = methods[m]
            ex = i["mask_search_examples"] / max(d["mask_search_examples"], 1)
            ex_all = i["mask_search_examples"] / max(d["mask_search_examples"] + distill_examples, 1)
            parts.append(f"| {pretty(m)} / DP | {ex:,.1f}x | "
                         f"{i.get('search_wall_s', 0) / max(d.get('search_wall_s', 0), 1e-9):,.1f}x |")
            parts.append(f"| {pretty(m)} / (DP + distillation + experts) | {ex_all:,.2f}x | "
                         f"{i.get('search_wall_s', 0) / max(d.get('search_wall_s', 0) + distill_wall, 1e-9):,.2f}x |")
        parts += ["", f"Distillation: {phases.get('distill_examples', 0):,} examples, "
                  f"{phases.get('distill_wall_s', 0):.0f} s; experts: "
                  f"{phases.get('expert_examples', 0):,} examples, {phases.get('expert_wall_s', 0):.0f} s."]
    parts += ["", f"Total wall time: {summary.get('wall_s', 0):.0f} s on "
              f"{summary.get('backend', '?')}.", ""]
    return parts


def write_report(workdir: str) -> str:
    """Write report.md and plots/*.png for ``workdir``; returns the report text."""
    rows = io.read_jsonl(workdir_lib.rounds_path(workdir))
    if not rows:
        raise ValueError(f"{workdir}/rounds.jsonl has no rounds; nothing to report")
    summary_path = workdir_lib.summary_path(workdir)
    summary = io.read_json(summary_path) if os.path.exists(summary_path) else {}
    cfg_path = workdir_lib.config_path(workdir)
    cfg = io.read_json(cfg_path) if os.path.exists(cfg_path) else {}
    agg = aggregate(rows)
    title = f"{cfg.get('model', {}).get('name', '')} on {cfg.get('data', {}).get('name', '')}"
    plot_accuracy_vs_sparsity(agg, workdir_lib.plot_path(workdir, "accuracy_vs_sparsity.png"), title)
    parts = [f"# Pruning report: {title}", "",
             "Test accuracy (%) of each round's mask, trained on the real training set; "
             "mean ± std over seeds.", "", accuracy_table(agg), "",
             "![accuracy vs sparsity](plots/accuracy_vs_sparsity.png)", ""]
    tickets = ticket_sparsity(agg)
    parts += ["Highest sparsity whose accuracy is within 1 point of the dense network: " +
              ", ".join(f"{pretty(m)} {100 * s:.1f}%" for m, s in sorted(tickets.items())), ""]
    if summary.get("methods"):
        parts += cost_section(summary, agg)
        plot_accuracy_vs_examples(agg, workdir_lib.plot_path(workdir, "accuracy_vs_examples.png"))
        parts += ["![accuracy vs examples](plots/accuracy_vs_examples.png)", ""]
    labels = sorted(agg)
    pairs = [(a, b) for a in labels if a.startswith("dp") for b in labels if b.startswith("imp_k")]
    if pairs:
        parts += ["## Mask agreement", "", "Hamming distance (fraction of prunable weights on "
                  "which the masks differ) and IoU of the kept weights, mean over seeds.", "",
                  "| round | " + " | ".join(f"{pretty(a)} vs {pretty(b)}" for a, b in pairs) + " |",
                  "|---|" + "---|" * len(pairs)]
        tables = [{r["round"]: r for r in mask_agreement(workdir, a, b)} for a, b in pairs]
        for rnd in sorted(set().union(*[t.keys() for t in tables])):
            cells = [f"{t[rnd]['hamming']:.3f} / {t[rnd]['iou']:.3f}" if rnd in t else ""
                     for t in tables]
            parts.append(f"| {rnd} | " + " | ".join(cells) + " |")
        parts.append("")
    table = layer_sparsity_table(workdir)
    if table:
        parts += ["## Per-layer sparsity of the last round", "", table, ""]
    text = "\n".join(parts)
    path = workdir_lib.report_path(workdir)
    if os.path.exists(path):  # keep the block written by `python -m dp_jax.analysis`
        old = open(path).read()
        start, end = old.find(ANALYSIS_BEGIN), old.find(ANALYSIS_END)
        if 0 <= start < end:
            text += "\n" + old[start:end + len(ANALYSIS_END)] + "\n"
    io.atomic_write_bytes(path, text.encode())
    return text


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m dp_jax.report WORKDIR")
    print(write_report(sys.argv[1]))
