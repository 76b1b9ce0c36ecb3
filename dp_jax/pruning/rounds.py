"""The generic pruning-round engine shared by every method (see dp_jax.methods).

One *run* is one method for one seed. Round 0 is the dense network; round
``r >= 1`` derives a new mask from round ``r-1`` (nested: pruned stays pruned) as the
method's plan says, resets the surviving weights to the plan's starting point and trains
them on real data; the resulting test accuracy is the round's evaluation.

Every round ends with a checkpoint (mask + trained weights + the records so far),
so a killed run restarts after its last complete round and finishes with the same
records and masks as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from typing import Any, Callable, Optional

import jax

from dp_jax.system import compile_time
from dp_jax.storage import integrity
from dp_jax.storage import fileio
from dp_jax import masks as masks_lib
from dp_jax.pruning import records as records_lib
from dp_jax import rng
from dp_jax.training import trainer as train_lib
from dp_jax.rundir import paths as workdir_lib
from dp_jax.rundir import verified

PyTree = Any


def sparsity_after(rounds: int, fraction: float) -> float:
    """Sparsity after ``rounds`` rounds of pruning ``fraction`` of the remainder."""
    return 1.0 - (1.0 - fraction) ** rounds


@dataclasses.dataclass
class Setup:
    """What every run of an experiment shares (built once; jitted programs reused)."""
    model: Any
    trainer: train_lib.Trainer
    tx: Any
    x_train: jax.Array
    y_train: jax.Array
    x_test: jax.Array
    y_test: jax.Array
    image_shape: tuple
    num_steps: int          # optimiser steps of one real-data training
    rounds: int
    fraction: float
    scope: str
    on_empty_layer: str
    init_fn: Callable[[jax.Array], dict]   # key -> variables
    num_classes: int = 0
    layer_rates: dict = dataclasses.field(default_factory=dict)  # {layer: rate multiplier}
    min_per_layer: int = 0  # the layer-collapse guard of every pruning step
    log_epoch: Callable[..., None] = lambda **kw: None
    stream: Any = None  # dp_jax.data.pipeline.StreamingData when data.pipeline='stream'


def prune_step(setup: Setup, scores: PyTree, mask: PyTree, *,
               fraction: Optional[float] = None) -> PyTree:
    """Prune ``fraction`` (default ``prune.fraction``) of ``mask``'s survivors by ``scores``,
    with the experiment's scope, per-layer rates and layer-collapse guard."""
    return masks_lib.prune(scores, mask, setup.fraction if fraction is None else fraction,
                           scope=setup.scope, on_empty_layer=setup.on_empty_layer,
                           layer_rates=setup.layer_rates, min_per_layer=setup.min_per_layer)


def train_and_eval(setup: Setup, variables: dict, mask: PyTree, key: jax.Array, *,
                   start_step: int = 0, snapshot_steps=(), log: Optional[dict] = None):
    """Train ``variables`` under ``mask`` on the real training set and test.

    Training starts at global step ``start_step`` (rewinding to step k keeps the
    learning-rate schedule and data order of the dense run from step k on).

    Returns:
      ``(state, eval_metrics, snapshots, train_metrics)``.
    """
    state = train_lib.create_state(variables, mask, setup.tx, start_step=start_step)
    last = {}

    def on_epoch(epoch, m):
        last.update(m)
        setup.log_epoch(epoch=epoch, **(log or {}), **m)

    if setup.stream is not None:
        # The host pipeline orders the data from an integer seed; derive it from the key so
        # that, as in memory, a step's batch depends only on (key, step).
        seed = int(jax.random.randint(key, (), 0, 2**31 - 1))
        batches = setup.stream.train_iterator(
            global_batch_size=setup.trainer.batch_size, seed=seed, start_step=start_step,
            num_steps=setup.num_steps)
        state, snaps = setup.trainer.train_stream(state, batches, key, setup.num_steps,
                                                  snapshot_steps=snapshot_steps,
                                                  on_epoch=on_epoch)
        ev = setup.trainer.evaluate_stream(
            state.params, state.batch_stats, state.mask,
            setup.stream.eval_batches(global_batch_size=setup.trainer.eval_batch_size),
            len(setup.stream.test))
        return state, ev, snaps, last
    state, snaps = setup.trainer.train(state, setup.x_train, setup.y_train, key,
                                       setup.num_steps, snapshot_steps=snapshot_steps,
                                       on_epoch=on_epoch)
    ev = setup.trainer.evaluate(state.params, state.batch_stats, state.mask,
                                setup.x_test, setup.y_test)
    return state, ev, snaps, last


def _trained(state) -> dict:
    return {"params": state.params, "batch_stats": state.batch_stats}


class Run:
    """Checkpoint bookkeeping of one (method, seed) run (paths from dp_jax.rundir.paths).

    Every mask, round checkpoint and rounds.jsonl is recorded in the run's checksum manifest
    when written (:mod:`dp_jax.storage.integrity`). On resume a damaged or unrecorded latest
    round falls back to the previous good one (and is recomputed); a missing or damaged mask of
    a finished round is rewritten from that round's checkpoint. A run made before checksums
    (no manifest, no marker in identity.json) is trusted as it is, then adopted: its files are
    recorded and identity.json marked, so that from then on a missing manifest is damage.
    """

    def __init__(self, workdir: str, spec, seed: int, *, keep: str = "all"):
        self.workdir, self.spec, self.seed = workdir, spec, seed
        self.dir = workdir_lib.run_dir(workdir, spec.label, seed)
        self.ckpt = fileio.RoundCheckpointer(workdir_lib.checkpoints_dir(workdir, spec.label, seed),
                                         max_to_keep=None if keep == "all" else 2)
        self.rounds_path = workdir_lib.run_rounds_path(workdir, spec.label, seed)

    def mask_path(self, rnd: int) -> str:
        """Path of the mask saved after round ``rnd``."""
        return workdir_lib.mask_path(self.workdir, self.spec.label, self.seed, rnd)

    def _rel(self, path: str) -> str:
        return os.path.relpath(path, self.dir)

    def resume(self, like: dict) -> tuple[int, Optional[dict], list]:
        """``(next_round, arrays, records)`` from the last good round, or a fresh start."""
        marked = verified.made_with_checksums(self.workdir, self.spec.label, self.seed)
        # Made before checksums: trusted as before. With the marker, a lost manifest leaves
        # every round unrecorded: all are recomputed.
        legacy = not marked and not integrity.has_records(self.dir)
        for step in reversed(self.ckpt.all_steps()):
            rel = f"checkpoints/{step}"
            why = None if legacy else integrity.problem(self.dir, rel)
            if why is None:
                try:
                    arrays, payload = self.ckpt.restore(step, like)
                except ValueError as e:
                    why = str(e)
                else:
                    self._repair_masks(step, like, legacy)
                    if not marked:
                        self._adopt(step)
                    return step + 1, arrays, list(payload["records"])
            warnings.warn(f"round checkpoint {os.path.join(self.dir, rel)} is {why}; "
                          f"recomputing from round {step - 1}", RuntimeWarning, stacklevel=2)
            integrity.forget(self.dir, rel)
            self.ckpt.delete(step)
        verified.mark_checksums(self.workdir, self.spec.label, self.seed)  # all recorded anew
        return 0, None, []

    def _repair_masks(self, last: int, like: dict, legacy: bool) -> None:
        """Rewrite the mask of any finished round whose file is missing or damaged."""
        for rnd in range(last + 1):
            path = self.mask_path(rnd)
            why = ("missing" if not os.path.exists(path) else None) if legacy else \
                integrity.problem(self.dir, self._rel(path))
            if why is None:
                continue
            if rnd not in self.ckpt.all_steps():
                raise ValueError(f"mask {path} is {why} and round {rnd}'s checkpoint is no "
                                 "longer kept (checkpoint.keep='last'); use a new workdir")
            warnings.warn(f"mask {path} is {why}; rewriting it from round {rnd}'s checkpoint",
                          RuntimeWarning, stacklevel=3)
            arrays, _ = self.ckpt.restore(rnd, like)
            masks_lib.save(path, arrays["mask"])
            integrity.record(self.dir, self._rel(path))

    def _adopt(self, last: int) -> None:
        """Record the finished rounds' files that have no record yet (a run made before
        checksums: trusted as they are), then mark it. Its rounds.jsonl is rewritten from
        the checkpoint, and recorded, right after."""
        integrity.adopt(self.dir, [self._rel(self.mask_path(r)) for r in range(last + 1)]
                        + [f"checkpoints/{s}" for s in self.ckpt.all_steps()])
        verified.mark_checksums(self.workdir, self.spec.label, self.seed)

    def write_records(self, records: list) -> None:
        """(Re)write the run's rounds.jsonl and record it."""
        fileio.write_jsonl(self.rounds_path, records)
        integrity.record(self.dir, self._rel(self.rounds_path))

    def commit(self, rnd: int, mask: PyTree, arrays: dict, records: list) -> None:
        """Persist round ``rnd``: mask file, checkpoint, then rounds.jsonl (each checksummed)."""
        path = self.mask_path(rnd)
        masks_lib.save(path, mask)
        integrity.record(self.dir, self._rel(path))
        self.ckpt.save(rnd, arrays, {"records": records})
        integrity.record(self.dir, f"checkpoints/{rnd}")
        self.write_records(records)

    def close(self):
        """Release the checkpoint manager."""
        self.ckpt.close()


def run_rounds(setup: Setup, run: Run, dense: dict, *, seed_key: jax.Array,
               next_mask: Callable[[int, PyTree, dict], PyTree],
               start_point: Callable[[int], tuple[dict, int]],
               search_examples: Callable[[int], int],
               uses_trained: Callable[[int], bool] = lambda rnd: False,
               trains: Callable[[int], bool] = lambda rnd: True,
               on_round: Callable[[dict], None] = lambda r: None):
    """The generic pruning loop every method runs (its plan gives the callables below).

    Args:
      setup: the shared setup.
      run: where this run's files go.
      dense: the seed's dense result (``variables``, ``trained``, ``record``).
      seed_key: the seed's root key.
      next_mask: ``(round, mask, trained) -> mask`` for round ``round``.
      start_point: ``round -> (variables, start_step)`` to train round ``round`` from.
      search_examples: ``round -> examples`` the mask search processes to produce that
        round's mask (its evaluation training is not counted). ``train_examples`` in
        the records is the cumulative sum: the cost of finding the round's mask.
      uses_trained: ``round -> bool``, whether that round's mask is derived from the
        previous round's trained weights (so that training counts as search time).
      trains: ``round -> bool``, whether the round is trained and tested
        (:func:`dp_jax.pruning.plan.rounds_to_train`); an untrained round still makes and
        saves its mask, and its record has no test accuracy.
      on_round: called with each new record (progress display).

    Returns:
      The run's records, rounds 0..R.
    """
    mask, trained, records, start = begin_rounds(run, dense, on_round)
    data_key = jax.random.fold_in(seed_key, rng.DATA)
    for rnd in range(start, setup.rounds + 1):
        t0, c0 = time.time(), compile_time.seconds()
        mask = jax.block_until_ready(next_mask(rnd, mask, trained))
        t_mask = time.time() - t0
        variables, start_step = start_point(rnd)
        if trains(rnd):
            state, ev, _, tm = train_and_eval(
                setup, variables, mask, data_key, start_step=start_step,
                log={"run": run.spec.label, "seed": run.seed, "round": rnd})
            trained = _trained(state)
        else:
            ev, tm = records_lib.NOT_TRAINED, {}  # ``trained`` stays the last trained round's
        finish_round(run, rnd, mask, trained, ev, tm, records, t_mask=t_mask,
                     train_s=time.time() - t0 - t_mask, compile_s=compile_time.seconds() - c0,
                     search_examples=search_examples(rnd), uses_trained=uses_trained(rnd))
        on_round(records[-1])
    return records


def begin_rounds(run: Run, dense: dict, on_round: Callable[[dict], None]):
    """Resume ``run`` (or commit its round 0, the dense network): ``(mask, trained, records,
    next_round)``; every finished round's record goes to ``on_round``."""
    dense_mask = masks_lib.ones_like(dense["variables"]["params"])
    like = {"mask": dense_mask, "trained": dense["trained"]}
    start, arrays, records = run.resume(like)
    if start == 0:
        rec = dict(dense["record"], method=run.spec.label, base_method=run.spec.name,
                   rewind_step=run.spec.rewind_step, train_examples=0, search_s=0.0,
                   mask_s=0.0, train_s=dense["record"]["wall_s"])
        records = [rec]
        arrays = {"mask": dense_mask, "trained": dense["trained"]}
        run.commit(0, dense_mask, arrays, records)
        on_round(rec)
        start = 1
    else:
        # The kill may have come between the checkpoint and the records file.
        run.write_records(records)
        for rec in records:  # count the finished rounds in the progress display
            on_round(rec)
    return arrays["mask"], arrays["trained"], records, start


def finish_round(run: Run, rnd: int, mask: PyTree, trained: dict, ev: dict, tm: dict,
                 records: list, *, t_mask: float, train_s: float, compile_s: float,
                 search_examples: int, uses_trained: bool) -> None:
    """Append round ``rnd``'s record to ``records`` and commit the round. An untrained
    round's checkpoint holds the last trained round's weights (it is not read as its own:
    :func:`dp_jax.pruning.records.round_trained`)."""
    prev = records[-1]
    # Search time: computing this mask, plus the previous training when the mask
    # was derived from its weights (IMP); DP's search is its inner loop alone.
    search_s = prev.get("search_s", 0.0) + t_mask + (
        prev.get("train_s", prev["wall_s"]) if uses_trained else 0.0)
    rec = records_lib.make_record(run.spec, run.seed, rnd, mask, ev,
                                  prev["train_examples"] + search_examples,
                                  t_mask + train_s, train_accuracy=tm.get("accuracy"),
                                  mask_s=t_mask, train_s=train_s, search_s=search_s,
                                  compile_s=compile_s)
    records.append(rec)
    run.commit(rnd, mask, {"mask": mask, "trained": trained}, records)


def switch_round(sparsity: float, fraction: float) -> int:
    """First round whose sparsity reaches ``sparsity`` (DP-then-IMP hands over there)."""
    r = 0
    while sparsity_after(r, fraction) < sparsity - 1e-9:
        r += 1
    return r
