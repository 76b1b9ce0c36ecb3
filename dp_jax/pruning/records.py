"""Records: one line of rounds.jsonl per round's mask (trained and tested, or only made when
``prune.evaluate`` skips the round's training), and the per-method figures that
summary.json, report.md and merged reports print (one owner for each figure)."""

from __future__ import annotations

from typing import Any

import numpy as np

from dp_jax import masks as masks_lib
from dp_jax.rundir import paths as workdir_lib
from dp_jax.rundir import verified
from dp_jax.storage import fileio

PyTree = Any

# Record fields that measure time: they differ between any two runs of the same settings.
TIMINGS = ("wall_s", "mask_s", "train_s", "search_s", "compile_s")


# The evaluation of a round the engine did not train (``prune.evaluate``): no test figures.
NOT_TRAINED = {"accuracy": None, "loss": None}


def evaluated(rows: list[dict]) -> list[dict]:
    """The records of trained and tested rounds (without those ``prune.evaluate`` skipped)."""
    return [r for r in rows if r.get("test_accuracy") is not None]


def round_trained(workdir: str, label: str, seed: int, rnd: int) -> bool:
    """Whether the run trained round ``rnd`` (so that its checkpoint holds the round's own
    trained weights); False for a round ``prune.evaluate`` skipped or one not finished."""
    return any(r["round"] == rnd for r in evaluated(verified.run_records(workdir, label, seed)))


def make_record(spec, seed: int, rnd: int, mask: PyTree, ev: dict,
                train_examples: int, wall_s: float, **extra) -> dict:
    """One line of rounds.jsonl."""
    alive, total = masks_lib.count(mask)
    rec = {"method": spec.label, "base_method": spec.name, "round": rnd, "seed": seed,
           "sparsity": masks_lib.sparsity(mask), "remaining_weights": alive,
           "prunable_weights": total, "test_accuracy": ev["accuracy"],
           "test_loss": ev["loss"], "train_examples": int(train_examples),
           "rewind_step": spec.rewind_step, "wall_s": float(wall_s)}
    rec.update(extra)
    return rec


def without_timings(row: dict) -> dict:
    """``row`` without the fields that measure time (what two equal runs share)."""
    return {k: v for k, v in row.items() if k not in TIMINGS}


def merge_rounds(workdir: str) -> list:
    """Rewrite the top-level rounds.jsonl from every run's own rounds.jsonl; returns the rows."""
    rows = []
    for label, seed in workdir_lib.list_runs(workdir):
        rows.extend(verified.run_records(workdir, label, seed))  # checked, read strictly
    fileio.write_jsonl(workdir_lib.rounds_path(workdir), rows)
    return rows


def method_figures(rows: list[dict]) -> dict[str, dict]:
    """Per method label (in order of appearance), the figures of its last round over seeds,
    its dense accuracy and its compute: summary.json's ``methods``."""
    by_method: dict[str, list] = {}
    for r in rows:
        by_method.setdefault(r["method"], []).append(r)
    out = {}
    for label, every in by_method.items():
        rs = evaluated(every)  # the figures are those of trained rounds; the compute is all
        last_round = max(r["round"] for r in rs)
        final = [r for r in rs if r["round"] == last_round]
        dense = [r for r in rs if r["round"] == 0]
        out[label] = {
            "rounds": last_round, "seeds": sorted({r["seed"] for r in rs}),
            "final_sparsity": float(np.mean([r["sparsity"] for r in final])),
            "final_test_accuracy_mean": float(np.mean([r["test_accuracy"] for r in final])),
            # Sample std (ddof=1) over seeds, the convention of every table; None for one seed.
            "final_test_accuracy_std": (float(np.std([r["test_accuracy"] for r in final], ddof=1))
                                        if len(final) > 1 else None),
            "dense_test_accuracy_mean": (float(np.mean([r["test_accuracy"] for r in dense]))
                                         if dense else None),
            "mask_search_examples": int(max(r["train_examples"] for r in final)),
            "search_wall_s": float(np.mean([r.get("search_s", 0.0) for r in final])),
            "wall_s": float(sum(r["wall_s"] for r in every)),
            # Compilation inside those wall times (a warm compilation cache removes most).
            "compile_s": float(sum(r.get("compile_s", 0.0) for r in every)),
        }
    return out
