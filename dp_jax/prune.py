"""Pruning rounds: IMP with rewinding, random pruning and re-initialisation.

One *run* is one method for one seed. Round 0 is the dense network; round
``r >= 1`` derives a new mask from round ``r-1`` (nested: pruned stays pruned),
resets the surviving weights to the method's starting point and trains them on
real data; the resulting test accuracy is the round's evaluation.

  method   mask of round r                         starting weights
  imp      |trained weights of round r-1|          dense weights at step k (k=0: init)
  random   random scores (same schedule)           init (or step k)
  reinit   the source run's mask of round r        a fresh random init

Every round ends with a checkpoint (mask + trained weights + the records so far),
so a killed run restarts after its last complete round and finishes with the same
records and masks as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from dp_jax import io
from dp_jax import masks as masks_lib
from dp_jax import train as train_lib

PyTree = Any
METHODS = ("imp", "random", "reinit", "dp", "dp_imp")

# Purposes for jax.random.fold_in on a seed's root key: one stream per consumer.
KEY_INIT, KEY_DATA, KEY_RANDOM_PRUNE, KEY_REINIT, KEY_DISTILL, KEY_INNER = range(6)
KEY_ANALYSIS = 1000  # dp_jax.analysis folds its own sub-purposes into this one


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A pruning method as written in ``prune.method`` (e.g. ``imp:k=200``)."""
    name: str
    rewind_step: int = 0
    source: Optional[str] = None  # reinit: the label of the run whose masks are reused

    @property
    def label(self) -> str:
        """Run label used in rounds.jsonl, directory names and plots."""
        if self.name in ("imp", "dp_imp"):
            return f"{self.name}_k{self.rewind_step}"
        if self.name == "reinit":
            return f"reinit_{self.source}"
        return self.name


def parse_methods(text: str, *, default_rewind_step: int) -> list[MethodSpec]:
    """Parse ``'imp,imp:k=200,random,reinit:of=imp_k0'`` into method specs.

    Raises ValueError naming ``prune.method`` and the allowed values.
    """
    specs = []
    for item in [t.strip() for t in str(text).split(",") if t.strip()]:
        name, _, opts = item.partition(":")
        if name not in METHODS:
            raise ValueError(f"prune.method: unknown method {name!r} in {text!r}; "
                             f"allowed: {', '.join(METHODS)} (options: imp:k=STEP, reinit:of=LABEL)")
        kw = {}
        for opt in [o for o in opts.split(";") if o]:
            k, _, v = opt.partition("=")
            if k == "k" and name in ("imp", "random", "dp", "dp_imp"):
                try:
                    kw["rewind_step"] = int(v)
                except ValueError:
                    raise ValueError(f"prune.method: k must be an integer step, got {v!r}") from None
                if kw["rewind_step"] < 0:
                    raise ValueError(f"prune.method: k must be >= 0, got {v!r}")
            elif k == "of" and name == "reinit":
                kw["source"] = v
            else:
                raise ValueError(f"prune.method: option {opt!r} is not valid for {name!r}; "
                                 "allowed: k=STEP for imp/random/dp/dp_imp, of=LABEL for reinit")
        if name == "imp":
            kw.setdefault("rewind_step", default_rewind_step)
        if name == "reinit":
            kw.setdefault("source", "imp_k0")
        specs.append(MethodSpec(name=name, **kw))
    if not specs:
        raise ValueError("prune.method is empty; allowed: " + ", ".join(METHODS))
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"prune.method lists a run twice: {labels}")
    for s in specs:
        if s.name == "reinit" and s.source not in labels[:labels.index(s.label)]:
            raise ValueError(f"prune.method: reinit:of={s.source} needs the run {s.source!r} "
                             f"listed before it; runs: {labels}")
    return specs


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
    log_epoch: Callable[..., None] = lambda **kw: None
    stream: Any = None  # dp_jax.data.pipeline.StreamingData when data.pipeline='stream'


def train_and_eval(setup: Setup, variables: dict, mask: PyTree, key: jax.Array, *,
                   start_step: int = 0, snapshot_steps=(), log: Optional[dict] = None):
    """Train ``variables`` under ``mask`` on the real training set and test.

    Training starts at global step ``start_step`` (rewinding to step k keeps the
    learning-rate schedule and data order of the dense run from step k on).

    Returns:
      ``(state, eval_metrics, snapshots, train_metrics)``.
    """
    state = train_lib.create_state(variables, mask, setup.tx)
    state = state.replace(step=jnp.asarray(start_step, jnp.int32))
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


def make_record(spec: MethodSpec, seed: int, rnd: int, mask: PyTree, ev: dict,
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


class Run:
    """Directory and checkpoint bookkeeping of one (method, seed) run."""

    def __init__(self, workdir: str, spec: MethodSpec, seed: int):
        self.spec, self.seed = spec, seed
        self.dir = os.path.join(workdir, "runs", f"{spec.label}-seed{seed}")
        self.ckpt = io.RoundCheckpointer(os.path.join(self.dir, "checkpoints"))

    def mask_path(self, rnd: int) -> str:
        """Path of the mask saved after round ``rnd``."""
        return os.path.join(self.dir, "masks", f"round_{rnd:03d}.npz")

    def resume(self, like: dict) -> tuple[int, Optional[dict], list]:
        """``(next_round, arrays, records)`` from the last complete round, or a fresh start."""
        last = self.ckpt.latest()
        if last is None:
            return 0, None, []
        arrays, payload = self.ckpt.restore(last, like)
        return last + 1, arrays, list(payload["records"])

    def commit(self, rnd: int, mask: PyTree, arrays: dict, records: list) -> None:
        """Persist round ``rnd``: mask file, checkpoint, then the run's rounds.jsonl."""
        masks_lib.save(self.mask_path(rnd), mask)
        self.ckpt.save(rnd, arrays, {"records": records})
        io.write_jsonl(os.path.join(self.dir, "rounds.jsonl"), records)

    def close(self):
        """Release the checkpoint manager."""
        self.ckpt.close()


def run_rounds(setup: Setup, run: Run, dense: dict, *, seed_key: jax.Array,
               next_mask: Callable[[int, PyTree, dict], PyTree],
               start_point: Callable[[int], tuple[dict, int]],
               search_examples: Callable[[int], int],
               uses_trained: Callable[[int], bool] = lambda rnd: False,
               on_round: Callable[[dict], None] = lambda r: None):
    """The generic pruning loop shared by IMP, random pruning and re-initialisation.

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
      on_round: called with each new record (progress display).

    Returns:
      The run's records, rounds 0..R.
    """
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
        io.write_jsonl(os.path.join(run.dir, "rounds.jsonl"), records)
        for rec in records:  # count the finished rounds in the progress display
            on_round(rec)
    mask, trained = arrays["mask"], arrays["trained"]
    data_key = jax.random.fold_in(seed_key, KEY_DATA)
    for rnd in range(start, setup.rounds + 1):
        t0 = time.time()
        mask = jax.block_until_ready(next_mask(rnd, mask, trained))
        t_mask = time.time() - t0
        variables, start_step = start_point(rnd)
        state, ev, _, tm = train_and_eval(
            setup, variables, mask, data_key, start_step=start_step,
            log={"run": run.spec.label, "seed": run.seed, "round": rnd})
        trained = _trained(state)
        prev = records[-1]
        # Search time: computing this mask, plus the previous training when the mask
        # was derived from its weights (IMP); DP's search is its inner loop alone.
        search_s = prev.get("search_s", 0.0) + t_mask + (
            prev.get("train_s", prev["wall_s"]) if uses_trained(rnd) else 0.0)
        rec = make_record(run.spec, run.seed, rnd, mask, ev,
                          prev["train_examples"] + search_examples(rnd),
                          time.time() - t0, train_accuracy=tm.get("accuracy"),
                          mask_s=t_mask, train_s=time.time() - t0 - t_mask, search_s=search_s)
        records.append(rec)
        run.commit(rnd, mask, {"mask": mask, "trained": trained}, records)
        on_round(rec)
    return records


def magnitude_next_mask(setup: Setup) -> Callable:
    """IMP: prune the smallest-magnitude surviving weights of the last trained network."""
    def fn(rnd, mask, trained):
        return masks_lib.prune(masks_lib.magnitude_scores(trained["params"]), mask,
                               setup.fraction, scope=setup.scope,
                               on_empty_layer=setup.on_empty_layer)
    return fn


def random_next_mask(setup: Setup, seed_key: jax.Array) -> Callable:
    """Random pruning: same schedule, scores drawn fresh each round from the seed's key."""
    key = jax.random.fold_in(seed_key, KEY_RANDOM_PRUNE)

    def fn(rnd, mask, trained):
        scores = masks_lib.random_scores(trained["params"], jax.random.fold_in(key, rnd))
        return masks_lib.prune(scores, mask, setup.fraction, scope=setup.scope,
                               on_empty_layer=setup.on_empty_layer)
    return fn


def source_next_mask(source_run_dir: str, like_params: PyTree) -> Callable:
    """Re-initialisation: reuse another run's mask of the same round."""
    def fn(rnd, mask, trained):
        path = os.path.join(source_run_dir, "masks", f"round_{rnd:03d}.npz")
        if not os.path.exists(path):
            raise FileNotFoundError(f"reinit needs {path}; run its source method first")
        return masks_lib.load(path, like_params)
    return fn


def rewind_start(dense: dict, step: int) -> Callable:
    """Start every round from the dense run's weights at ``step`` (0 = init)."""
    def fn(rnd):
        v = dense["variables"] if step == 0 else dense["snapshots"][step]
        return v, step
    return fn


def make_inner_train(model, dp_cfg, distilled_lr: float, augment, params_like=None,
                     image_shape=None) -> Callable:
    """The DP inner loop: masked training on the distilled set, compiled once, vmapped over seeds.

    ``dp.loop`` picks the loop form: ``scan`` (the whole inner loop is one program),
    ``python`` (a jitted chunk of ``dp.chunk`` steps, default 1, driven from Python), or
    ``auto`` (:func:`dp_jax.train.resolve_loop` on ``params_like`` and ``image_shape``).
    Both take identical steps.

    Returns ``fn(variables, mask, x, y, keys) -> (params, final_loss)`` where ``keys`` has one
    key per inner seed; the params of every seed are returned (leading axis).
    """
    lr = float(dp_cfg.lr) if dp_cfg.lr > 0 else float(distilled_lr)
    tx_cfg = dict(optimizer="sgd", lr=lr, momentum=dp_cfg.momentum, weight_decay=dp_cfg.weight_decay,
                  schedule="multistep" if dp_cfg.decay_at else "constant",
                  decay_at=tuple(dp_cfg.decay_at), decay_factor=dp_cfg.decay_factor)
    tx = train_lib.make_optimizer(_Attrs(tx_cfg), dp_cfg.steps)
    loop_form = dp_cfg.get("loop", "scan")
    if loop_form == "auto":
        loop_form = ("scan" if params_like is None
                     else train_lib.resolve_loop("auto", params_like, model, image_shape))
    if loop_form == "python":
        loop = train_lib.make_inner_python(model, tx, num_steps=dp_cfg.steps,
                                           batch_size=dp_cfg.batch_size, augment=augment,
                                           chunk=dp_cfg.chunk)

        def run_python(variables, mask, x, y, keys):
            state, metrics = loop(variables, mask, x, y, keys)
            return state.params, metrics["loss"][:, -1]
        return run_python
    loop = train_lib.make_inner_loop(model, tx, num_steps=dp_cfg.steps, batch_size=dp_cfg.batch_size,
                                     augment=augment, unroll=dp_cfg.unroll, chunk=dp_cfg.chunk)

    def fn(variables, mask, x, y, keys):
        state, metrics = jax.vmap(loop, in_axes=(None, None, None, None, 0))(variables, mask, x, y, keys)
        return state.params, metrics["loss"][:, -1]
    return jax.jit(fn)


class _Attrs(dict):
    """A dict readable as attributes (what make_optimizer expects of a config)."""
    __getattr__ = dict.get


def distilled_next_mask(setup: Setup, inner: Callable, variables: dict, x, y, seed_key,
                        num_inner_seeds: int) -> Callable:
    """Distilled Pruning: train the masked init on the distilled set, prune by magnitude.

    With several inner seeds the score is the mean magnitude over the seeds' trained
    weights (independent data orders and augmentations).
    """
    key = jax.random.fold_in(seed_key, KEY_INNER)

    def fn(rnd, mask, trained):
        keys = jax.random.split(jax.random.fold_in(key, rnd), num_inner_seeds)
        params, final_loss = inner(variables, mask, x, y, keys)
        scores = jax.tree.map(lambda p: jnp.mean(jnp.abs(p), axis=0), params)
        return masks_lib.prune(scores, mask, setup.fraction, scope=setup.scope,
                               on_empty_layer=setup.on_empty_layer)
    return fn


def switch_round(sparsity: float, fraction: float) -> int:
    """First round whose sparsity reaches ``sparsity`` (DP-then-IMP hands over there)."""
    r = 0
    while sparsity_after(r, fraction) < sparsity - 1e-9:
        r += 1
    return r


def hybrid_next_mask(first: Callable, then: Callable, switch: int) -> Callable:
    """Use ``first`` for rounds <= ``switch`` and ``then`` afterwards (DP, then IMP)."""
    def fn(rnd, mask, trained):
        return first(rnd, mask, trained) if rnd <= switch else then(rnd, mask, trained)
    return fn
