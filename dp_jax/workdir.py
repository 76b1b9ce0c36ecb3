"""The run-directory contract: the only module that formats or parses its paths.

  config.json, metrics.jsonl, rounds.jsonl, summary.json, report.md, plots/*.png
  distilled.npz, checkpoints/distill/      (distillation, when made in the workdir)
  runs/<label>-seed<s>/                     one (method, seed) run; ``dense`` is the shared
      masks/round_XXX.npz                   dense training of a seed
      checkpoints/                          orbax round checkpoints
      rounds.jsonl                          the run's own records
  analysis/<label>-seed<s>-roundXXX*.json   per-mask analysis results, plus summaries
"""

from __future__ import annotations

import os
import re

CONFIG, METRICS, ROUNDS, SUMMARY, REPORT = (
    "config.json", "metrics.jsonl", "rounds.jsonl", "summary.json", "report.md")
DENSE = "dense"  # label of a seed's shared dense training
_RUN = re.compile(r"^(?P<label>.+)-seed(?P<seed>\d+)$")
_MASK = re.compile(r"^round_(?P<round>\d{3,})\.npz$")


def config_path(workdir: str) -> str:
    """The resolved config of the run."""
    return os.path.join(workdir, CONFIG)


def metrics_path(workdir: str) -> str:
    """Per-epoch training and distillation metrics (JSON lines)."""
    return os.path.join(workdir, METRICS)


def rounds_path(workdir: str) -> str:
    """One record per evaluated mask, every run merged (JSON lines)."""
    return os.path.join(workdir, ROUNDS)


def summary_path(workdir: str) -> str:
    """Final figures per method and compute per phase."""
    return os.path.join(workdir, SUMMARY)


def report_path(workdir: str) -> str:
    """The human-readable report."""
    return os.path.join(workdir, REPORT)


def plot_path(workdir: str, name: str) -> str:
    """``plots/<name>`` (name includes the extension)."""
    return os.path.join(workdir, "plots", name)


def distilled_path(workdir: str) -> str:
    """The distilled set made in this workdir."""
    return os.path.join(workdir, "distilled.npz")


def distilled_grid_path(workdir: str) -> str:
    """Picture of the distilled set."""
    return os.path.join(workdir, "distilled.png")


def experts_dir(workdir: str) -> str:
    """Default expert-trajectory buffer of the distillation."""
    return os.path.join(workdir, "experts")


def distill_checkpoints(workdir: str) -> str:
    """Checkpoints of the distillation loop."""
    return os.path.join(workdir, "checkpoints", "distill")


def analysis_dir(workdir: str) -> str:
    """Where analysis results go."""
    return os.path.join(workdir, "analysis")


def analysis_path(workdir: str, name: str) -> str:
    """``analysis/<name>``."""
    return os.path.join(analysis_dir(workdir), name)


def analysis_stem(label: str, seed: int, rnd: int) -> str:
    """File stem of one mask's analysis results, e.g. ``imp_k0-seed0-round002``."""
    return f"{run_name(label, seed)}-round{rnd:03d}"


def run_name(label: str, seed: int) -> str:
    """Directory name of a (method label, seed) run."""
    return f"{label}-seed{int(seed)}"


def parse_run_name(name: str):
    """``(label, seed)`` of a run directory name, or None when it is not one."""
    m = _RUN.match(name)
    return (m["label"], int(m["seed"])) if m else None


def runs_dir(workdir: str) -> str:
    """The directory holding every run."""
    return os.path.join(workdir, "runs")


def run_dir(workdir: str, label: str, seed: int) -> str:
    """``runs/<label>-seed<s>``."""
    return os.path.join(runs_dir(workdir), run_name(label, seed))


def checkpoints_dir(workdir: str, label: str, seed: int) -> str:
    """Orbax round checkpoints of a run (``label=DENSE`` for the dense training)."""
    return os.path.join(run_dir(workdir, label, seed), "checkpoints")


def run_rounds_path(workdir: str, label: str, seed: int) -> str:
    """A run's own rounds.jsonl."""
    return os.path.join(run_dir(workdir, label, seed), ROUNDS)


def mask_path(workdir: str, label: str, seed: int, rnd: int) -> str:
    """The mask of round ``rnd`` of a run."""
    return os.path.join(run_dir(workdir, label, seed), "masks", f"round_{int(rnd):03d}.npz")


def list_runs(workdir: str) -> list[tuple[str, int]]:
    """Sorted ``(label, seed)`` of every run directory (the dense trainings included)."""
    d = runs_dir(workdir)
    names = sorted(os.listdir(d)) if os.path.isdir(d) else []
    return [p for p in map(parse_run_name, names) if p is not None]


def list_masks(workdir: str, label: str, seed: int) -> dict[int, str]:
    """``{round: path}`` of the mask files a run has written."""
    d = os.path.join(run_dir(workdir, label, seed), "masks")
    out = {}
    for f in sorted(os.listdir(d)) if os.path.isdir(d) else []:
        m = _MASK.match(f)
        if m:
            out[int(m["round"])] = os.path.join(d, f)
    return out
