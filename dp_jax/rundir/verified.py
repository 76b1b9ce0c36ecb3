"""Checked reading of a workdir: every reader of masks, records, checkpoints and analysis
results goes through here, so that a damaged file is named, never used.

Each file is checked against its directory's checksum manifest (:mod:`dp_jax.storage.integrity`);
a problem raises a one-line ValueError naming the file and why (the command line prints it and
exits with status 2). Which files must have a record depends on who made the directory:

* a run whose identity.json carries the :data:`~dp_jax.rundir.paths.CHECKSUMS` marker (made,
  or adopted on resume, by this version) records every file: an unrecorded one, or a missing
  checksums.json, is damage;
* an older run records its masks and checkpoints at most: recorded files are checked, the
  others are trusted as they were (a workdir made before checksums has no manifest at all);
* the analysis directory records every per-mask result (a missing manifest beside the
  ``done_*`` records is damage); summaries are checked when recorded.

The workdir's rounds.jsonl is derived from the runs' own: its rows must equal theirs.
"""

from __future__ import annotations

import os
from typing import Any

from dp_jax.rundir import paths
from dp_jax.storage import fileio, integrity, npz


def made_with_checksums(workdir: str, label: str, seed: int) -> bool:
    """Whether the run's identity.json carries the :data:`~dp_jax.rundir.paths.CHECKSUMS`
    marker (every file of the run is then recorded)."""
    path = paths.identity_path(workdir, label, seed)
    return os.path.exists(path) and fileio.read_json(path).get(paths.CHECKSUMS) == 1


def mark_checksums(workdir: str, label: str, seed: int) -> None:
    """Add the marker to the run's identity.json once every file of the run is recorded (a run
    made before the marker, adopted on resume); no-op for a run without identity.json."""
    path = paths.identity_path(workdir, label, seed)
    if os.path.exists(path) and not made_with_checksums(workdir, label, seed):
        fileio.write_json(path, dict(fileio.read_json(path), **{paths.CHECKSUMS: 1}))


def run_file(workdir: str, label: str, seed: int, path: str, what: str) -> str:
    """``path`` (a file or checkpoint directory inside the run's directory) once it checks out;
    else ValueError ``"<what> <path> is <why>"``."""
    d = paths.run_dir(workdir, label, seed)
    return integrity.verified(d, os.path.relpath(path, d), what,
                              required=made_with_checksums(workdir, label, seed))


def mask_file(workdir: str, label: str, seed: int, rnd: int) -> str:
    """The checked path of round ``rnd``'s mask of a run."""
    return run_file(workdir, label, seed, paths.mask_path(workdir, label, seed, rnd), "mask")


def mask_arrays(workdir: str, label: str, seed: int, rnd: int) -> dict:
    """``{parameter path: bool array}`` of round ``rnd``'s mask, checked."""
    return npz.read(mask_file(workdir, label, seed, rnd), "mask file")


def checkpoint_dir(workdir: str, label: str, seed: int, step: int) -> str:
    """The checked directory of checkpoint ``step`` of a run (``label=DENSE``: the dense run)."""
    path = os.path.join(paths.checkpoints_dir(workdir, label, seed), str(step))
    return run_file(workdir, label, seed, path, "checkpoint")


def run_records(workdir: str, label: str, seed: int) -> list[dict]:
    """The run's own rounds.jsonl, checked and read strictly ([] for a run with no round yet)."""
    path = paths.run_rounds_path(workdir, label, seed)
    d = paths.run_dir(workdir, label, seed)
    if not os.path.exists(path) and not integrity.recorded(d, paths.ROUNDS):
        return []
    return fileio.read_jsonl(run_file(workdir, label, seed, path, "records file"), strict=True)


def _by_round(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: repr(r.get("round")))


def workdir_records(workdir: str) -> list[dict]:
    """The rows of the workdir's rounds.jsonl, read strictly, each run's equal to the run's own
    checked rounds.jsonl (a workdir of records alone, without run directories, is read as is).
    """
    path = paths.rounds_path(workdir)
    rows = fileio.read_jsonl(path, strict=True)
    by_run: dict = {}
    for r in rows:
        by_run.setdefault((r.get("method"), r.get("seed")), []).append(r)
    runs = set(paths.list_runs(workdir))
    if not runs and not os.path.isdir(paths.runs_dir(workdir)):
        return rows
    for label, seed in sorted(runs | set(by_run), key=repr):
        if (label, seed) not in runs:
            raise ValueError(f"{path} is damaged: it holds records of {label} seed {seed}, "
                             "which has no run directory")
        own = run_records(workdir, label, seed)
        if _by_round(own) != _by_round(by_run.get((label, seed), [])):
            raise ValueError(
                f"{path} is damaged: its records of {label} seed {seed} differ from "
                f"{paths.run_rounds_path(workdir, label, seed)} (edited, or cut short by a "
                "kill: running the experiment again rewrites it)")
    return rows


def analysis_json(workdir: str, name: str) -> Any:
    """The analysis result ``analysis/<name>``, checked and parsed."""
    adir = paths.analysis_dir(workdir)
    per_mask = paths.parse_analysis_file(name) is not None
    # done_*.json: analysis/resume.py's records of finished masks, always entered in the manifest
    required = per_mask and (integrity.has_records(adir) or any(
        f.startswith("done_") for f in os.listdir(adir)))
    return fileio.read_json(integrity.verified(adir, name, "analysis result", required=required))


def any_mask(path: str) -> str:
    """``path`` checked against its run's manifest when it is the mask of a workdir's run
    (``.../runs/<label>-seed<s>/masks/round_XXX.npz``); a mask from elsewhere, which no manifest
    describes, is returned as is."""
    masks = os.path.dirname(os.path.abspath(path))
    run = os.path.dirname(masks)
    parsed = paths.parse_run_name(os.path.basename(run))
    if parsed is None or os.path.basename(masks) != "masks" or \
            os.path.basename(os.path.dirname(run)) != "runs":
        return path
    return run_file(os.path.dirname(os.path.dirname(run)), *parsed, path, "mask")
