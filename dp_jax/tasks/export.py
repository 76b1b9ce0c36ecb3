"""Tickets: one self-describing file per (run, seed, round) of a workdir (``dp-jax export``).

A ticket is an npz (no pickles) holding

  ``__meta__``                   JSON text: format ``dp_jax.ticket``, version, run label, method,
                                 seed, round, start point, where the trained weights came from,
                                 the round's record (rounds.jsonl), the config, sparsity, a
                                 re-evaluation check and the parameter paths of every section
  ``mask/<path>``                bool arrays keyed by '/'-joined parameter path
  ``init/params/<path>``         the weights the round trained from (and ``init/batch_stats``)
  ``trained/params/<path>``      the weights after the round's training (and
                                 ``trained/batch_stats``)

``__meta__["sha256"]`` is a digest of the rest (:func:`content_digest`): :func:`load_ticket`
refuses a ticket whose content no longer matches it (a bit flip, a changed weight, an edited
accuracy), whose weights are not finite, or whose trained weights are nonzero where its mask is
0. A ticket exported before the digest existed loads with a warning (its other checks still run).

The start point is re-derived exactly as the experiment does: round 0 is every method's dense
network, trained from the seed's ``rng.INIT`` init; later rounds train from that init (k = 0),
the dense run's weights at step k (rewinding; training then starts at global step k) or the
seed's ``rng.REINIT`` init (``reinit``). The trained weights are restored from the run's round
checkpoint when it is kept, else retrained from the start point with the seed's ``rng.DATA``
key (bit-identical to the run's own training); ``trained_source`` records which.
"""

from __future__ import annotations

import hashlib
import io as _io
import json
import os
import warnings
from typing import Optional

import jax
import numpy as np

from dp_jax.system.versions import DP_JAX_VERSION as __version__
from dp_jax.pruning import setup as setup_lib
from dp_jax.pruning import dense
from dp_jax.storage import fileio
from dp_jax import masks as masks_lib
from dp_jax import methods
from dp_jax.pruning import rounds as prune_lib
from dp_jax.pruning import records
from dp_jax import rng
from dp_jax.rundir import lock as lock_lib
from dp_jax.rundir import paths as workdir_lib
from dp_jax.rundir import verified
from dp_jax.pruning.plan import Start
from dp_jax.pruning.settings import Experiment
from dp_jax.tasks import settings as settings_lib

FORMAT, VERSION = "dp_jax.ticket", 1
META = "__meta__"
SECTIONS = ("mask", "init/params", "init/batch_stats", "trained/params", "trained/batch_stats")
SOURCES = ("auto", "checkpoint", "retrain")
DIGEST = "sha256"  # the meta field holding content_digest; optional: older tickets lack it
REQUIRED = ("run", "method", "seed", "round", "start", "trained_source", "record", "config",
            "sparsity", "arrays")


def rebuild_setup(settings: Experiment) -> prune_lib.Setup:
    """The experiment's setup (model, trainer, data), as the experiment builds it."""
    return setup_lib.build_setup(settings, setup_lib.load_data(settings))


def _find(workdir: str, settings: Experiment, label: str, seed: int, rnd: int):
    """``(spec, record, mask path)`` of a round; clear errors when it does not exist."""
    if label == workdir_lib.DENSE:
        raise ValueError("--run=dense is the shared dense training; export round 0 of a "
                         "method instead (it is the dense network)")
    specs = {s.label: s for s in settings.specs}
    if label not in specs:
        raise ValueError(f"--run={label} is not a run of {workdir}; runs: {', '.join(specs)}")
    seeds = sorted(s for lab, s in workdir_lib.list_runs(workdir) if lab == label)
    if seed not in seeds:
        raise ValueError(f"--seed={seed}: {workdir} has no {label} run of that seed; seeds: "
                         f"{seeds}")
    records = {r["round"]: r for r in verified.run_records(workdir, label, seed)}
    if rnd not in records:
        raise ValueError(f"--round={rnd}: {label} seed {seed} has not finished that round; "
                         f"finished rounds: {sorted(records)}")
    return specs[label], records[rnd], verified.mask_file(workdir, label, seed, rnd)


def start_point(setup: prune_lib.Setup, workdir: str, spec, seed: int, rnd: int):
    """``(variables, start_step, description)`` that round ``rnd`` of the run trained from."""
    start = methods.get(spec.name).start(spec)
    if rnd == 0 or start == Start("rewind", 0):
        v, step, desc = setup.init_fn(rng.key_for(seed, rng.INIT)), 0, {"kind": "init"}
    elif start.reinit:
        v, step, desc = setup.init_fn(rng.key_for(seed, rng.REINIT)), 0, {"kind": "reinit"}
    elif start.kind == "trained":  # learning-rate rewinding: round rnd - 1's trained weights
        v, step, desc = _previous_round(setup, workdir, spec, seed, rnd), 0, {
            "kind": "trained", "round": rnd - 1}
    else:
        step = int(start.step)
        # A reader does not repair the workdir: a damaged dense checkpoint is an error.
        v = dense.dense_run(setup, workdir, seed, [step], repair=False)["snapshots"][step]
        desc = {"kind": "rewind"}
    desc.update(step=step, seed=seed)
    return {"params": v["params"], "batch_stats": v.get("batch_stats", {})}, step, desc


def _previous_round(setup, workdir: str, spec, seed: int, rnd: int) -> dict:
    """The trained weights round ``rnd`` started from: round ``rnd - 1``'s (round 0's are the
    dense run's), from their checkpoints; never retrained (that would hide damage)."""
    if rnd == 1:
        return dense.dense_run(setup, workdir, seed, [], repair=False)["trained"]
    init = setup.init_fn(rng.key_for(seed, rng.INIT))
    like = {"params": init["params"], "batch_stats": init.get("batch_stats", {})}
    arrays, why = _checkpointed(workdir, spec.label, seed, rnd - 1,
                                {"mask": masks_lib.ones_like(like["params"]), "trained": like})
    if arrays is None:
        raise ValueError(f"{spec.label} round {rnd} trained from round {rnd - 1}'s weights, "
                         f"which cannot be read: {why} (a run made with checkpoint.keep='all' "
                         "keeps them)")
    return arrays["trained"]


def _checkpointed(workdir: str, label: str, seed: int, rnd: int, like: dict):
    """``(arrays, None)`` from the round checkpoint, or ``(None, why not)``; a checkpoint that
    fails its checksum is a ValueError (retraining would hide the damage)."""
    d = workdir_lib.checkpoints_dir(workdir, label, seed)
    if not os.path.isdir(d):
        return None, f"{d} does not exist"
    if rnd > 0 and not records.round_trained(workdir, label, seed, rnd):
        return None, f"round {rnd} was not trained in the run (prune.evaluate)"
    ckpt = fileio.RoundCheckpointer(d, max_to_keep=None)  # None: opening must never delete rounds
    try:
        steps = ckpt.all_steps()
        if rnd not in steps:
            return None, f"round {rnd}'s checkpoint is not kept (kept: {steps})"
        try:
            verified.checkpoint_dir(workdir, label, seed, rnd)
        except ValueError as e:
            raise ValueError(f"round {e}; --source=retrain retrains the round instead") from None
        try:
            return ckpt.restore(rnd, like)[0], None
        except ValueError as e:
            return None, str(e)
    finally:
        ckpt.close()


def _flat(tree) -> dict[str, np.ndarray]:
    return {masks_lib.path_str(p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _trained(setup, workdir, spec, seed, rnd, variables, step, mask, source):
    """``(trained, source, note)``: the round's trained weights, restored or retrained."""
    arrays, why = (None, "--source=retrain") if source == "retrain" else _checkpointed(
        workdir, spec.label, seed, rnd, {"mask": masks_lib.ones_like(variables["params"]),
                                         "trained": variables})
    if arrays is not None:
        if any(not np.array_equal(a, b) for a, b in
               zip(jax.tree.leaves(arrays["mask"]), jax.tree.leaves(mask))):
            raise ValueError(f"round {rnd}'s mask file and checkpoint of {spec.label} seed "
                             f"{seed} differ: {workdir} is inconsistent")
        return arrays["trained"], "checkpoint", "restored from the run's round checkpoint"
    if source == "checkpoint":
        raise ValueError(f"--source=checkpoint: {why}; use --source=auto to retrain it")
    state, _, _, _ = prune_lib.train_and_eval(setup, variables, mask,
                                              rng.key_for(seed, rng.DATA), start_step=step)
    return ({"params": state.params, "batch_stats": state.batch_stats}, "retrained",
            f"retrained from the start point with the seed's data key ({why})")


def build_ticket(workdir: str, label: str, seed: int, rnd: int, *, source: str = "auto",
                 setup: Optional[prune_lib.Setup] = None, plugins=None,
                 trust_plugins: bool = False) -> tuple[dict, dict]:
    """The ticket of round ``rnd`` of run ``label``, seed ``seed``: ``(meta, sections)`` with
    ``sections`` = ``{"mask" | "init/params" | ...: {parameter path: array}}``.

    ``source``: ``auto`` (the round checkpoint when kept, else retrain), ``checkpoint`` or
    ``retrain``. ``setup`` reuses an already built setup of this workdir's config.
    ``plugins``/``trust_plugins``: see :func:`dp_jax.tasks.settings.from_workdir`.
    """
    if source not in SOURCES:
        raise ValueError(f"--source={source!r} is invalid; allowed: {', '.join(SOURCES)}")
    settings, config = settings_lib.from_workdir(workdir, plugins=plugins,
                                                 trust_plugins=trust_plugins)
    spec, record, mask_path = _find(workdir, settings, label, int(seed), int(rnd))
    setup = setup or rebuild_setup(settings)
    variables, step, start = start_point(setup, workdir, spec, int(seed), int(rnd))
    mask = masks_lib.load(mask_path, variables["params"])
    trained, got, note = _trained(setup, workdir, spec, int(seed), int(rnd), variables, step,
                                  mask, source)
    check = None
    if setup.stream is None:  # the file re-verifies itself against the recorded evaluation
        ev = setup.trainer.evaluate(trained["params"], trained["batch_stats"], mask,
                                    setup.x_test, setup.y_test)
        check = {"test_accuracy": ev["accuracy"], "test_loss": ev["loss"],
                 "matches_record": None if record["test_accuracy"] is None  # not trained
                 else ev["accuracy"] == record["test_accuracy"]
                 and ev["loss"] == record["test_loss"]}
    sections = {"mask": _flat(mask), "init/params": _flat(variables["params"]),
                "init/batch_stats": _flat(variables["batch_stats"]),
                "trained/params": _flat(trained["params"]),
                "trained/batch_stats": _flat(trained["batch_stats"])}
    meta = {"format": FORMAT, "version": VERSION, "dp_jax_version": __version__,
            "workdir": os.path.abspath(workdir), "run": label, "method": spec.name,
            "seed": int(seed), "round": int(rnd), "start": start, "trained_source": got,
            "trained_note": note, "record": record, "config": config,
            "sparsity": masks_lib.sparsity(mask), "check": check,
            "arrays": {sec: list(flat) for sec, flat in sections.items()}}
    meta[DIGEST] = content_digest(meta, _payload(sections))
    return meta, sections


def _payload(sections: dict) -> dict[str, np.ndarray]:
    """A ticket's arrays as stored: ``{"<section>/<parameter path>": array}``."""
    return {f"{sec}/{k}": v for sec, flat in sections.items() for k, v in flat.items()}


def content_digest(meta: dict, arrays: dict) -> str:
    """SHA-256 of a ticket's content: every array (name, dtype, shape and bytes, in name order)
    and the metadata without its digest field (as canonical JSON)."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.asarray(arrays[name])
        a = np.ascontiguousarray(a.astype(a.dtype.newbyteorder("<"), copy=False))
        # dtype and shape fix the byte count, so the stream parses one way only.
        h.update(json.dumps([name, a.dtype.str, list(a.shape)]).encode() + b"\0")
        h.update(a.tobytes())
    body = {k: v for k, v in meta.items() if k != DIGEST}
    # Through JSON once first: the digest of a meta must equal that of its reloaded copy
    # (tuples become lists, int keys strings).
    h.update(json.dumps(json.loads(json.dumps(body)), sort_keys=True).encode())
    return h.hexdigest()


def export_ticket(workdir: str, label: str, seed: int, rnd: int, out: str, *,
                  source: str = "auto", setup: Optional[prune_lib.Setup] = None,
                  plugins=None, trust_plugins: bool = False) -> dict:
    """Write the ticket of :func:`build_ticket` to ``out`` (one npz; inside the workdir under
    its lock); returns its meta."""
    meta, sections = build_ticket(workdir, label, seed, rnd, source=source, setup=setup,
                                  plugins=plugins, trust_plugins=trust_plugins)
    buf = _io.BytesIO()
    np.savez_compressed(buf, **{META: np.array(json.dumps(meta))}, **_payload(sections))
    with lock_lib.writing_into(workdir, out):
        fileio.atomic_write_bytes(out, buf.getvalue())
    return meta


def _damaged(path: str, why: str) -> ValueError:
    return ValueError(f"{path} is not a valid dp_jax ticket: {why}")


def load_ticket(path: str) -> dict:
    """Read and check a ticket written by :func:`export_ticket`.

    Returns ``{"meta", "config", "record", "mask", "init", "trained"}``: ``mask`` is the
    params-shaped bool tree, ``init`` and ``trained`` hold ``params`` and ``batch_stats``
    trees (nested dicts of numpy arrays). Raises ValueError naming ``path`` when the file is
    damaged or edited (content digest), foreign, of another format version, holds non-finite
    weights or trained weights outside its mask; warns for a ticket without a digest.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"ticket {path} not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(str(arrays.pop(META)[()])) if META in arrays else None
    except Exception as e:  # zip, zlib, pickle and JSON errors alike
        raise _damaged(path, f"unreadable ({type(e).__name__}: {e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _damaged(path, f"no {META} entry of format {FORMAT!r} (not an exported ticket)")
    if meta.get("version") != VERSION:
        raise _damaged(path, f"format version {meta.get('version')!r}; this dp_jax reads "
                             f"version {VERSION}")
    missing = [f for f in REQUIRED if f not in meta]
    if missing or sorted(meta["arrays"]) != sorted(SECTIONS):
        raise _damaged(path, f"its metadata lacks {missing or 'sections'}")
    want = {f"{sec}/{k}" for sec, keys in meta["arrays"].items() for k in keys}
    if want != set(arrays):
        raise _damaged(path, f"arrays missing {sorted(want - set(arrays))[:4]}, "
                             f"unexpected {sorted(set(arrays) - want)[:4]}")
    if DIGEST not in meta:
        warnings.warn(f"ticket {path} has no content digest (exported by an older dp_jax): "
                      "damage or edits cannot be detected", RuntimeWarning, stacklevel=2)
    elif content_digest(meta, arrays) != meta[DIGEST]:
        raise _damaged(path, "damaged or edited (its content does not match its sha256)")
    sec = {s: {k: arrays[f"{s}/{k}"] for k in meta["arrays"][s]} for s in SECTIONS}
    _check_sections(path, sec)
    return ticket_objects(meta, sec)


def ticket_objects(meta: dict, sections: dict) -> dict:
    """``{"meta", "config", "record", "mask", "init", "trained"}`` of a ticket's sections:
    ``mask`` the params-shaped bool tree, ``init``/``trained`` ``params`` and ``batch_stats``
    trees (nested dicts of numpy arrays)."""
    nest = masks_lib.from_flat
    return {"meta": meta, "config": meta["config"], "record": meta["record"],
            "mask": nest(sections["mask"]),
            "init": {"params": nest(sections["init/params"]),
                     "batch_stats": nest(sections["init/batch_stats"])},
            "trained": {"params": nest(sections["trained/params"]),
                        "batch_stats": nest(sections["trained/batch_stats"])}}


def _check_sections(path: str, sec: dict) -> None:
    """Mask, init and trained weights must describe the same network."""
    def shapes(s):
        return {k: v.shape for k, v in sec[s].items()}
    if not all(v.dtype == np.bool_ for v in sec["mask"].values()):
        raise _damaged(path, "its mask has non-bool entries")
    if not shapes("mask") == shapes("init/params") == shapes("trained/params"):
        raise _damaged(path, "its mask, init and trained params differ in keys or shapes")
    if shapes("init/batch_stats") != shapes("trained/batch_stats"):
        raise _damaged(path, "its init and trained batch_stats differ in keys or shapes")
    for s in SECTIONS[1:]:
        for k, v in sec[s].items():
            if v.dtype.kind in "fc" and not np.isfinite(v).all():
                raise _damaged(path, f"{s}/{k} has non-finite values")
    for k, m in sec["mask"].items():
        # Training re-masks after every update, so a pruned weight of a real ticket is exactly 0.
        if np.any(sec["trained/params"][k][~m] != 0):
            raise _damaged(path, f"trained/params/{k} is nonzero where its mask is 0 (the mask "
                                 "and the weights disagree)")
