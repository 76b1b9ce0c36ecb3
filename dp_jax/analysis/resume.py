"""What lets an analysis skip work: finished masks' results, and the runs' kept checkpoints.

*Per-mask resume.* When every output of a mask is written, ``done_<stem>.json`` records the
analyses' settings digest, the mask's digest and the output files; all of them are entered in
the analysis directory's checksum manifest (:mod:`dp_jax.storage.integrity`). A later analysis with
the same settings skips a mask whose record and files are intact, and recomputes it otherwise
(a kill mid-mask, an edited or damaged output, other settings, a changed mask).

*Kept checkpoints.* Every round's trained weights are kept by default (``checkpoint.keep =
all``), so copy 0 of a mask -- the run's own training -- is read from the round checkpoint
instead of being trained again; a Hessian-only analysis then trains nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io as _io
import json
import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dp_jax.storage import integrity
from dp_jax.storage import fileio
from dp_jax import masks as masks_lib
from dp_jax.rundir import paths as workdir_lib
from dp_jax.pruning import records

DONE = "done"


def settings_digest(settings, analyses: Sequence[str]) -> str:
    """SHA-256 of everything besides the mask that decides a mask's analysis results."""
    blob = json.dumps({"settings": dataclasses.asdict(settings),
                       "analyses": sorted(analyses)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _done_name(label: str, seed: int, rnd: int) -> str:
    return workdir_lib.analysis_file(DONE, label, seed, rnd)


def finished(workdir: str, label: str, seed: int, rnd: int, digest: str,
             mask_sha1: str) -> Optional[dict]:
    """``{analysis: result}`` of a mask analysed before with these settings, or None."""
    adir = workdir_lib.analysis_dir(workdir)
    name = _done_name(label, seed, rnd)
    if integrity.problem(adir, name) is not None:
        return None
    done = fileio.read_json(os.path.join(adir, name))
    if done.get("settings") != digest or done.get("mask_sha1") != mask_sha1:
        return None
    if any(integrity.problem(adir, f) is not None for f in done["files"]):
        return None
    return {a: fileio.read_json(os.path.join(adir, f)) for a, f in done["results"].items()}


def write_results(workdir: str, label: str, seed: int, rnd: int, digest: str, meta: dict,
                  results: dict, arrays: dict, extra: Optional[dict] = None) -> dict:
    """Write one mask's outputs (``results``: analysis -> JSON dict, ``arrays``: (prefix,
    suffix) -> npz arrays) with ``meta`` and ``extra[analysis]`` (fields naming this mask's
    files) merged into each, then record them as finished."""
    out_dir = workdir_lib.analysis_dir(workdir)
    stem = workdir_lib.analysis_stem(label, seed, rnd)
    out, names, files = {}, {}, []
    extra = extra or {}
    for name, r in results.items():
        r = {**r, **meta, **extra.get(name, {})}
        names[name] = workdir_lib.analysis_file(name, label, seed, rnd)
        fileio.write_json(os.path.join(out_dir, names[name]), r)
        out[name] = r
    for (prefix, suffix), arr in arrays.items():
        files.append(prefix + stem + suffix)
        buf = _io.BytesIO()
        np.savez_compressed(buf, **arr)
        fileio.atomic_write_bytes(os.path.join(out_dir, files[-1]), buf.getvalue())
    mark_finished(workdir, label, seed, rnd, digest, meta["mask_sha1"], names,
                  list(names.values()) + files)
    return out


def mark_finished(workdir: str, label: str, seed: int, rnd: int, digest: str, mask_sha1: str,
                  results: dict, files: Sequence[str]) -> None:
    """Record a mask's outputs (``results``: analysis -> json file name; ``files``: all)."""
    adir = workdir_lib.analysis_dir(workdir)
    for f in files:
        integrity.record(adir, f)
    name = _done_name(label, seed, rnd)
    fileio.write_json(os.path.join(adir, name), {"settings": digest, "mask_sha1": mask_sha1,
                                             "results": dict(results), "files": list(files)})
    integrity.record(adir, name)  # last: a kill before this leaves the mask to recompute


def kept_trained(workdir: str, label: str, seed: int, rnd: int, like: dict) -> Optional[dict]:
    """The run's trained ``{"params", "batch_stats"}`` of round ``rnd`` from its kept checkpoint.

    None when the round's checkpoint is not kept (``checkpoint.keep='last'``), is damaged or
    unrecorded, or the round was not trained (``prune.evaluate``); then the analysis trains
    copy 0 itself.
    """
    run_dir = workdir_lib.run_dir(workdir, label, seed)
    ckpt_dir = workdir_lib.checkpoints_dir(workdir, label, seed)
    if not os.path.isdir(os.path.join(ckpt_dir, str(rnd))):
        return None
    if rnd > 0 and not records.round_trained(workdir, label, seed, rnd):
        return None  # prune.evaluate skipped its training: the checkpoint holds an older round's
    if integrity.has_records(run_dir) and \
            integrity.problem(run_dir, f"checkpoints/{rnd}") is not None:
        return None
    ckpt = fileio.RoundCheckpointer(ckpt_dir)
    try:
        arrays, _ = ckpt.restore(rnd, {"mask": masks_lib.ones_like(like["params"]),
                                       "trained": like})
    except ValueError:
        return None
    finally:
        ckpt.close()
    # Restored arrays are committed to a device; fresh ones are not. Mixing them would make
    # jit compile every program twice.
    return {k: _uncommitted(v) for k, v in arrays["trained"].items()}


def _uncommitted(tree):
    return jax.tree.map(lambda a: jnp.asarray(np.asarray(a)), tree)
