"""Merging the results of several workdirs (e.g. a sweep's seeds) into one report.

Merged workdirs must share every result-deciding setting except the seed (the ``dp`` and
``distill`` sections only where runs read them); a (method, seed) run found in several must
hold the same records, and is counted once.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from dp_jax.storage import fileio
from dp_jax.rundir import paths as workdir_lib
from dp_jax.rundir import verified
from dp_jax.pruning import records


# The cost table's fields of summary.json's per-method figures (a merged summary keeps these).
COST_FIELDS = ("final_sparsity", "mask_search_examples", "search_wall_s", "wall_s", "compile_s")


def method_costs(rows: list[dict]) -> dict[str, dict]:
    """Per method (sorted), the final figures of the cost table (as summary.json's ``methods``)."""
    figures = records.method_figures(rows)
    return {label: {k: figures[label][k] for k in COST_FIELDS} for label in sorted(figures)}


def _reads_small_set(workdir: str) -> bool:
    """Whether any run of ``workdir`` read the ``dp``/``distill`` sections (per its
    runs/<run>/identity.json; a run without one counts as reading them)."""
    for label, seed in workdir_lib.list_runs(workdir):
        path = workdir_lib.identity_path(workdir, label, seed)
        if not os.path.exists(path) or any(k.startswith(workdir_lib.SMALL_SET)
                                           for k in fileio.read_json(path)):
            return True
    return False


def _field_diff(a: dict, b: dict) -> list[str]:
    return [f"{k} ({a.get(k, '<unset>')!r} vs {b.get(k, '<unset>')!r})"
            for k in sorted(set(a) | set(b)) if a.get(k, "<unset>") != b.get(k, "<unset>")]


def _check_settings(configs: dict[str, dict]) -> None:
    """Refuse workdirs whose result-deciding settings differ (seeds aside), naming the fields.

    The ``dp``/``distill`` sections are compared only among workdirs whose runs read them: a
    workdir of IMP and random runs merges with a DP workdir whatever its distillation settings.
    """
    if len(configs) < 2:
        return
    if not all(configs.values()):
        raise ValueError("cannot merge: " + ", ".join(d for d, c in configs.items() if not c)
                         + " has no config.json to compare")
    ident = {d: {k: v for k, v in workdir_lib.identity_fields(c).items() if k != "seed"}
             for d, c in configs.items()}
    split = {d: ({k: v for k, v in f.items() if not k.startswith(workdir_lib.SMALL_SET)},
                 {k: v for k, v in f.items() if k.startswith(workdir_lib.SMALL_SET)})
             for d, f in ident.items()}
    small = [d for d in configs if _reads_small_set(d)]
    for part, dirs in ((0, list(configs)), (1, small)):
        for d in dirs[1:]:
            diff = _field_diff(split[dirs[0]][part], split[d][part])
            if diff:
                raise ValueError(f"cannot merge {dirs[0]} and {d}: their settings differ in "
                                 f"{', '.join(diff)}; only seeds may differ")


def gather(workdirs: Sequence[str]) -> dict:
    """Rows, config, summary and seeds of one workdir, or of several merged (seeds pooled).

    Merged workdirs must share every result-deciding setting but ``seed``/``seeds``; a
    (method, seed) run held by several must have the same records (timings aside) and is
    taken once. Raises ValueError naming the workdirs (and fields) otherwise, or naming a
    damaged records file (:func:`dp_jax.rundir.verified.workdir_records`).
    """
    runs, origin, configs, summaries, read = {}, {}, {}, [], {}
    for d in workdirs:
        rows = read[d] = verified.workdir_records(d)
        if not rows:
            raise ValueError(f"{d}/rounds.jsonl has no rounds; nothing to report")
        cfg, summ = workdir_lib.config_path(d), workdir_lib.summary_path(d)
        configs[d] = fileio.read_json(cfg) if os.path.exists(cfg) else {}
        summaries.append(fileio.read_json(summ) if os.path.exists(summ) else {})
        for key in sorted({(r["method"], r["seed"]) for r in rows}):
            rs = sorted((records.without_timings(r) for r in rows
                         if (r["method"], r["seed"]) == key), key=lambda r: r["round"])
            if runs.setdefault(key, rs) != rs:
                raise ValueError(f"cannot merge: {origin[key]} and {d} both hold {key[0]} "
                                 f"seed {key[1]} with different records")
            origin.setdefault(key, d)
    _check_settings(configs)
    rows = [r for d in workdirs for r in read[d] if origin[(r["method"], r["seed"])] == d]
    summary = {}
    if all(s.get("methods") for s in summaries):
        # Phases are per workdir (one distillation each): their mean over the workdirs that
        # ran the phase is the cost of one (a workdir without DP distils nothing).
        phases = [s.get("phases_s", {}) for s in summaries]
        summary = {"methods": method_costs(rows), "backend": summaries[0].get("backend", "?"),
                   "phases_s": {k: float(np.mean([p[k] for p in phases if k in p]))
                                for k in sorted({k for p in phases for k in p})},
                   "wall_s": float(sum(s.get("wall_s", 0) for s in summaries))}
    seeds = {d: sorted({s for (_, s), o in origin.items() if o == d}) for d in workdirs}
    return {"rows": rows, "config": next(iter(configs.values())), "summary": summary,
            "seeds": seeds}


def merge_note(g: dict) -> list[str]:
    """The report's line naming the merged workdirs and their seeds (nothing for one)."""
    if len(g["seeds"]) < 2:
        return []
    note = "Merged from " + ", ".join(f"`{d}` (seeds {', '.join(map(str, s)) or '-'})"
                                      for d, s in g["seeds"].items()) + "."
    if g["config"].get("data", {}).get("train_size"):
        note += " Each workdir drew its data.train_size subset with its own config.seed."
    return [note, ""]
