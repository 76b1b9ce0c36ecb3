r"""Compare finished distillations: a table of accuracy against cost and the accuracy-vs-budget plot.

  python -m dp_jax.distill.compare runs/distill_a runs/distill_b ... --out=runs/compare

Each argument is the workdir of a ``task=distill`` run (its summary.json, config.json and
metrics.jsonl). Writes ``compare.md`` (one row per set: method, model, images, distilled and
random-subset accuracy at the same number of images and at the same storage (as many real
images as stored ones: IDC's comparison for multi-formation sets), the gap to the latter, wall
and CPU seconds of experts and distillation) and
``accuracy_vs_budget.png``: the distilled accuracy against the distillation budget spent so far
(experts included), from the periodic evaluations (``distill.eval_every``) and the final one.
The budget of a periodic point excludes the periodic evaluations themselves.
"""

from __future__ import annotations

import os
from typing import Sequence

from dp_jax.system import figures
from dp_jax.storage import fileio
from dp_jax.rundir import paths as workdir_lib
from dp_jax.reports.curves import save_figure
from dp_jax.distill.sets import load_distilled


def _set_settings(workdir: str) -> dict:
    """The ``distill`` settings that made the workdir's set: the set's own record (right also
    for a set evaluated from ``distill.path``), else the workdir's config."""
    path = os.path.join(workdir, "distilled.npz")
    if os.path.exists(path):
        recorded = load_distilled(path).meta.get("distill")
        if recorded:
            return recorded
    return fileio.read_json(os.path.join(workdir, "config.json")).get("distill", {})


def load_run(workdir: str) -> dict:
    """The facts of one finished distillation workdir; ValueError naming what is missing."""
    path = os.path.join(workdir, "summary.json")
    if not os.path.exists(path):
        raise ValueError(f"{workdir}: no summary.json (not a finished distillation workdir)")
    s = fileio.read_json(path)
    if s.get("task") != "distill" or "results" not in s:
        raise ValueError(f"{path}: not a distillation summary (task={s.get('task')!r})")
    d = _set_settings(workdir)
    c = s.get("cost", {})
    experts_wall, experts_cpu = c.get("expert_wall_s", 0.0), c.get("expert_cpu_s")
    curve = [(experts_wall + r["distill_wall_s"], r["accuracy_mean"], r.get("accuracy_std", 0.0),
              r["iteration"])
             for r in fileio.read_jsonl(workdir_lib.metrics_path(workdir))
             if r.get("phase") == "distill_eval" and "distill_wall_s" in r]
    final = s["results"].get("distilled", {})
    budget = experts_wall + c.get("distill_wall_s", 0.0)
    if final:
        curve.append((budget, final["accuracy_mean"], final.get("accuracy_std", 0.0),
                      int(d.get("iterations", 0))))
    return {"label": os.path.basename(os.path.normpath(workdir)),
            "method": d.get("method", s.get("method")),
            "model": s.get("model", {}).get("name"), "images": s.get("images"),
            "ipc": s.get("ipc"), "factor": s.get("factor"), "iterations": d.get("iterations"),
            "distilled": final, "random": s["results"].get("random", {}),
            "random_stored": s["results"].get("random_stored", s["results"].get("random", {})),
            "experts_wall_s": experts_wall, "experts_cpu_s": experts_cpu,
            "distill_wall_s": c.get("distill_wall_s", 0.0), "distill_cpu_s": c.get("distill_cpu_s"),
            "budget_s": budget, "curve": sorted(curve)}


def _pct(r: dict) -> str:
    if not r:
        return "—"
    n = len(r.get("accuracies", [])) or 1
    return f"{100 * r['accuracy_mean']:.2f} ± {100 * r.get('accuracy_std', 0.0):.2f} ({n})"


def _secs(wall: float, cpu) -> str:
    return f"{wall:.0f} / " + ("—" if cpu is None else f"{cpu:.0f}")


def table(runs: Sequence[dict]) -> str:
    """The markdown comparison table (accuracies in %, mean ± std (models))."""
    lines = ["| set | method | model | images (ipc × factor²) | iterations | distilled | random "
             "real, same images | random real, same storage | gap (pts, same storage) | "
             "experts s wall / CPU | distillation s wall / CPU |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        dist, rand, stored = r["distilled"], r["random"], r["random_stored"]
        gap = (f"{100 * (dist['accuracy_mean'] - stored['accuracy_mean']):+.2f}"
               if dist and stored else "—")
        lines.append(
            f"| {r['label']} | {r['method']} | {r['model']} | {r['images']} ({r['ipc']} × "
            f"{r['factor']}²) | {r['iterations']} | {_pct(dist)} | {_pct(rand)} | "
            f"{_pct(stored)} | {gap} | "
            f"{_secs(r['experts_wall_s'], r['experts_cpu_s'])} | "
            f"{_secs(r['distill_wall_s'], r['distill_cpu_s'])} |")
    return "\n".join(lines) + "\n"


def plot(runs: Sequence[dict], path: str) -> bool:
    """Distilled accuracy vs budget (s, experts included), one line per set; False if no point."""
    runs = [r for r in runs if r["curve"]]
    if not runs:
        return False
    fig, ax = figures.subplots(figsize=(6.4, 4.2))
    for r in runs:
        x, y, e, _ = zip(*r["curve"])
        line = ax.errorbar(x, [100 * v for v in y], yerr=[100 * v for v in e], marker="o",
                           capsize=3, label=f"{r['label']} ({r['method']})")
        if r["random_stored"]:
            ax.axhline(100 * r["random_stored"]["accuracy_mean"], ls=":", lw=1,
                       color=line[0].get_color())
    ax.set_xlabel("distillation budget, wall s (experts included)")
    ax.set_ylabel("test accuracy of networks trained on the set, %")
    ax.set_title("accuracy vs budget (dotted: random real images, same storage)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)
    return True


def write(workdirs: Sequence[str], out: str) -> str:
    """Compare finished distillation workdirs into ``out`` (compare.md and the plot); every
    workdir is read and validated before anything is written. Returns the table."""
    runs = [load_run(w) for w in workdirs]
    os.makedirs(out, exist_ok=True)
    text = table(runs)
    fileio.atomic_write_bytes(os.path.join(out, "compare.md"), text.encode())
    plot(runs, os.path.join(out, "accuracy_vs_budget.png"))
    return text
