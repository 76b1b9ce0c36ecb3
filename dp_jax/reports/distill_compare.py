r"""Compare finished distillations: a table of accuracy against cost, the accuracy-vs-budget plot,
and each set against real subsets of its size chosen by the coreset rules.

  python -m dp_jax.distill.compare runs/distill_a runs/distill_b ... --out=runs/compare
  python -m dp_jax.distill.compare ... --out=DIR --baselines=random,herding,kcenter,forgetting
  python -m dp_jax.distill.compare ... --out=DIR --baselines=none

Each argument is the workdir of a ``task=distill`` run (its summary.json, config.json and
metrics.jsonl). Writes ``compare.md`` (one row per set: method, model, images, distilled and
random-subset accuracy at the same number of images and at the same storage (as many real
images as stored ones: IDC's comparison for multi-formation sets), the gap to the latter, wall
and CPU seconds of experts and distillation) and
``accuracy_vs_budget.png``: the distilled accuracy against the distillation budget spent so far
(experts included), from the periodic evaluations (``distill.eval_every``) and the final one.
The budget of a periodic point excludes the periodic evaluations themselves.

**Baselines** (:mod:`dp_jax.reports.distill_baselines`; ``baselines``, default its
:data:`DEFAULT_BASELINES`; the names of
:data:`dp_jax.data.coresets.SELECTIONS`): for every workdir with a ``distilled.npz``, real training
subsets with as many images of each class as the set *stores* (its ``ipc``) are chosen exactly as
the pruning control ``subset:n=N;select=S`` chooses them for the workdir's seed
(:mod:`dp_jax.methods.subset`: the stratified random draw, or :mod:`dp_jax.data.coresets` on the
probe networks' penultimate features, forgetting events or EL2N; one probe is shared by the
rules that need one), and trained by the distilled set's own evaluation: the same
``SetEvaluator`` settings (``distill.eval_*``, the workdir's model), the same K networks (inits,
minibatch and augmentation keys: :func:`dp_jax.distill.evaluate.set_eval_key`) and the step size
``distill.lr_init`` of the task's random subsets. Selections and their evaluations are cached under
``<out>/baselines/`` (atomic writes, named and checked by what made them), so a rerun trains no
probe and no network again. ``compare.md`` and ``compare.json`` put them side by side with the
published figures of DC's Table 1 (``DC_TABLE1_FMNIST_IPC10``).
"""

from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

from dp_jax.distill.sets import load_distilled
from dp_jax.reports.curves import save_figure
from dp_jax.reports.distill_baselines import (DC_TABLE1_FMNIST_IPC10, Baselines,
                                              baselines_table, parse_baselines, pct, set_size)
from dp_jax.rundir import paths as workdir_lib
from dp_jax.storage import fileio
from dp_jax.system import figures

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
            f"{r['factor']}²) | {r['iterations']} | {pct(dist)} | {pct(rand)} | "
            f"{pct(stored)} | {gap} | "
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


def write(workdirs: Sequence[str], out: str, *, baselines: Sequence[str] = (),
          settings_of: Optional[Callable] = None) -> str:
    """Compare finished distillation workdirs into ``out`` (compare.md, compare.json and the
    plot); every workdir is read and validated before anything is written. ``baselines`` (names
    of :data:`BASELINES`) are evaluated for each workdir with a distilled.npz, whose typed
    settings ``settings_of(workdir)`` returns (the command line passes
    ``tasks.settings.from_workdir``). Returns the markdown."""
    names = parse_baselines(",".join(baselines)) if baselines else ()
    if names and settings_of is None:
        raise ValueError("baselines need each workdir's settings: pass settings_of")
    runs = [load_run(w) for w in workdirs]
    jobs = {}
    if names:
        for w, r in zip(workdirs, runs):
            size = set_size(w)
            if size is None:
                r["baselines_note"] = "no distilled.npz in the workdir, baselines not evaluated"
                continue
            jobs[w] = (settings_of(w), size)
    os.makedirs(out, exist_ok=True)
    datasets: dict = {}
    for w, r in zip(workdirs, runs):
        if w in jobs:
            r["baselines"] = Baselines(*jobs[w], out, datasets).run(names)
    text = table(runs)
    if names:
        text += "\n" + baselines_table(runs, names)
    fileio.atomic_write_bytes(os.path.join(out, "compare.md"), text.encode())
    fileio.write_json(os.path.join(out, "compare.json"),
                      {"runs": runs, "baselines": list(names),
                       "published": DC_TABLE1_FMNIST_IPC10})
    plot(runs, os.path.join(out, "accuracy_vs_budget.png"))
    return text
