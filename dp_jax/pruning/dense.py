"""Each seed's dense run: trained once, shared by every method of that seed.

The dense network is round 0 of every method, IMP's first training and the source of the
rewind points (its weights at each rewind step k). Its checkpoint lives in the workdir's
``runs/dense-seed<s>`` (paths from :mod:`dp_jax.rundir.paths`); a finished one is restored, never
retrained. Each checkpoint is recorded in that directory's checksum manifest; a damaged one is
dropped and retrained with a warning (the same steps give the same weights), or, for readers
that must not write (``repair=False``), named in a ValueError.
"""

from __future__ import annotations

import os
import time
import warnings


from dp_jax.system import compile_time
from dp_jax.storage import fileio, integrity
from dp_jax import masks as masks_lib
from dp_jax.pruning.plan import DENSE
from dp_jax.pruning import records
from dp_jax.pruning import rounds as prune_lib
from dp_jax import rng
from dp_jax.pruning import seeds as seed_groups
from dp_jax.training import trainer as train_lib
from dp_jax.rundir import paths as workdir_lib
from dp_jax.rundir import verified


def _start(setup: prune_lib.Setup, seed: int):
    """The seed's initial variables, dense mask and data key."""
    variables = setup.init_fn(rng.key_for(seed, rng.INIT))
    return variables, masks_lib.ones_like(variables["params"]), rng.key_for(seed, rng.DATA)


def _checkpointer(workdir: str, seed: int) -> fileio.RoundCheckpointer:
    return fileio.RoundCheckpointer(workdir_lib.checkpoints_dir(workdir, workdir_lib.DENSE, seed))


def dense_run(setup: prune_lib.Setup, workdir: str, seed: int, rewind_steps, *,
              repair: bool = True) -> dict:
    """Train (or restore) the seed's dense network; keeps the weights at each rewind step.

    A rewind step the checkpoint does not hold yet (a method added to a finished workdir)
    is recomputed by retraining the dense run up to it -- the same steps, so the same
    weights -- and added to the checkpoint.

    Returns ``{"variables" (init), "trained", "snapshots" {step: weights}, "record"}``.
    ``repair``: see :func:`restore`.
    """
    steps = _steps(rewind_steps)
    got = restore(setup, workdir, seed, steps, repair=repair)
    if got is not None:
        return got
    variables, mask, data_key = _start(setup, seed)
    t0, c0 = time.time(), compile_time.seconds()
    state, ev, snaps, tm = prune_lib.train_and_eval(
        setup, variables, mask, data_key, snapshot_steps=steps,
        log={"run": "dense", "seed": seed, "round": 0})
    trained = {"params": state.params, "batch_stats": state.batch_stats}
    return _save(setup, workdir, seed, variables, trained, ev, tm, snaps, steps,
                 wall_s=time.time() - t0, compile_s=compile_time.seconds() - c0)


def dense_runs(setup: prune_lib.Setup, workdir: str, seeds: list, rewind_steps) -> list:
    """:func:`dense_run` for every seed, the untrained ones as one vmapped program."""
    steps = _steps(rewind_steps)
    out = {s: restore(setup, workdir, s, steps) for s in seeds}
    todo = [s for s in seeds if out[s] is None]
    if todo:
        starts = [_start(setup, s) for s in todo]
        t0, c0 = time.time(), compile_time.seconds()
        results = seed_groups.train_and_eval_seeds(
            setup, [v for v, _, _ in starts], [m for _, m, _ in starts],
            [k for _, _, k in starts], width=len(seeds), snapshot_steps=steps,
            logs=[{"run": "dense", "seed": s, "round": 0} for s in todo])
        wall, comp = (time.time() - t0) / len(todo), (compile_time.seconds() - c0) / len(todo)
        for s, (v, _, _), (trained, ev, snaps, tm) in zip(todo, starts, results):
            out[s] = _save(setup, workdir, s, v, trained, ev, tm, snaps, steps, wall_s=wall,
                           compile_s=comp)
    return [out[s] for s in seeds]


def _steps(rewind_steps) -> list:
    return sorted({int(k) for k in rewind_steps if k > 0})


def restore(setup: prune_lib.Setup, workdir: str, seed: int, steps: list, *,
            repair: bool = True):
    """The seed's finished dense run (missing rewind ``steps`` recomputed), or None.

    A checkpoint that fails its checksum is dropped with a warning (``repair``; the previous
    one, else a retraining, takes its place) or named in a ValueError (``repair=False``).
    """
    ckpt = _checkpointer(workdir, seed)
    try:
        last = _last_good(workdir, seed, ckpt, repair)
        if last is None:
            return None
        variables, mask, data_key = _start(setup, seed)
        trained_like = {"params": variables["params"],
                        "batch_stats": variables.get("batch_stats", {})}
        payload = ckpt.restore_payload(last)
        have = sorted(int(k) for k in payload.get("snapshot_steps", steps))
        like = {"trained": trained_like, "snapshots": {str(k): trained_like for k in have}}
        arrays, payload = ckpt.restore(last, like)
        snaps = {int(k): v for k, v in arrays["snapshots"].items()}
        missing = [k for k in steps if k not in snaps]
        if missing:
            snaps.update(_retrain_snapshots(setup, variables, mask, data_key, missing))
            keep = sorted(snaps)
            ckpt.save(last + 1, {"trained": arrays["trained"],
                                 "snapshots": {str(k): snaps[k] for k in keep}},
                      dict(payload, snapshot_steps=keep))
            _record(workdir, seed, last + 1)
        return {"variables": variables, "trained": arrays["trained"], "snapshots": snaps,
                "record": payload["record"]}
    finally:
        ckpt.close()


def _last_good(workdir: str, seed: int, ckpt: fileio.RoundCheckpointer, repair: bool):
    """The latest checkpoint step whose checksum holds (None: none); a run made before
    checksums is trusted, then adopted (its steps recorded, its identity.json marked)."""
    run = workdir_lib.run_dir(workdir, workdir_lib.DENSE, seed)
    marked = verified.made_with_checksums(workdir, workdir_lib.DENSE, seed)
    for step in reversed(ckpt.all_steps()):
        rel = f"checkpoints/{step}"
        why = integrity.problem(run, rel) if marked or integrity.has_records(run) else None
        if why is None:
            if not marked:
                integrity.adopt(run, [f"checkpoints/{s}" for s in ckpt.all_steps()])
                verified.mark_checksums(workdir, workdir_lib.DENSE, seed)
            return step
        path = os.path.join(run, rel)
        if not repair:
            raise ValueError(f"dense checkpoint {path} is {why}")
        warnings.warn(f"dense checkpoint {path} is {why}; dropping it (the dense run is "
                      "retrained if no earlier checkpoint holds)", RuntimeWarning, stacklevel=3)
        integrity.forget(run, rel)
        ckpt.delete(step)
    return None


def _record(workdir: str, seed: int, step: int) -> None:
    integrity.record(workdir_lib.run_dir(workdir, workdir_lib.DENSE, seed), f"checkpoints/{step}")


def _save(setup, workdir, seed, variables, trained, ev, tm, snaps, steps, *, wall_s,
          compile_s) -> dict:
    """Checkpoint a freshly trained dense run; returns it as :func:`dense_run` does."""
    record = records.make_record(
        DENSE, seed, 0, masks_lib.ones_like(variables["params"]), ev,
        setup.num_steps * setup.trainer.batch_size, wall_s, train_accuracy=tm.get("accuracy"),
        compile_s=compile_s)
    ckpt = _checkpointer(workdir, seed)
    try:
        ckpt.save(0, {"trained": trained, "snapshots": {str(k): snaps[k] for k in steps}},
                  {"record": record, "snapshot_steps": steps})
    finally:
        ckpt.close()
    _record(workdir, seed, 0)
    return {"variables": variables, "trained": trained, "snapshots": snaps, "record": record}


def _retrain_snapshots(setup, variables, mask, data_key, steps) -> dict:
    """The dense run's weights at ``steps``, by training it again from init up to them."""
    if setup.stream is not None:
        raise ValueError(f"rewind steps {steps} were added to a streamed run; the dense "
                         "training cannot be replayed from the stream: use a new workdir")
    state = train_lib.create_state(variables, mask, setup.tx)
    _, snaps = setup.trainer.train(state, setup.x_train, setup.y_train, data_key, max(steps),
                                   snapshot_steps=steps)
    return {k: snaps[k] for k in steps}
