"""The distillation loop every method runs through: iterations with checkpoints, metrics and
periodic evaluation.

A method is a :class:`dp_jax.distill.common.DistillProgram`: a state pytree and a step
``(state, it) -> (state, loss, info)`` whose randomness comes only from keys folded from the
iteration number (MTT: ``mtt.py``, gradient matching: ``gm.py``, distribution matching:
``dm.py``). So a run restored from the checkpoint after iteration ``it`` continues exactly as an
uninterrupted one (images, optimiser states, step size and metrics).

Resume precedence: the latest good checkpoint in ``<workdir>/checkpoints/distill`` wins;
otherwise the synthetic set starts from its initialisation. Each checkpoint's digest is recorded
in the workdir's checksum manifest (:mod:`dp_jax.storage.integrity`) when it is written; on
resume a damaged, unreadable or unrecorded one (a kill between the save and the record) is
discarded with a warning and recomputed from the previous good one or from the start (workdirs
made before checksums have no manifest and are trusted as before). Metric rows of iterations
after the resume point are dropped from ``metrics.jsonl`` (they are recomputed identically).

Per iteration the loop reads back one value, the loss (to log it and to stop on divergence);
``info`` values are read only when a metrics row is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from dp_jax.storage import fileio
from dp_jax.storage import integrity
from dp_jax import rng
from dp_jax.rundir import paths as workdir_lib
from dp_jax.distill import synthetic
from dp_jax.distill.common import DistillProgram
from dp_jax.distill.experts import distill_key
from dp_jax.training.outputs import TrainingDivergedError

PyTree = Any
DISTILL_PHASES = ("distill", "distill_eval")


@dataclasses.dataclass
class LoopResult:
    """What the distillation loop produced."""
    stored_images: np.ndarray
    stored_labels: np.ndarray
    images: np.ndarray
    labels: np.ndarray
    lr: float
    iterations: int
    examples: int          # examples the method processed (MTT: synthetic, students' batches)
    wall_s: float          # distillation wall time, summed over resumed sessions
    last_loss: float
    cpu_s: float = 0.0     # process CPU time (all threads) of the distillation, summed likewise


class _Clock:
    """Wall and CPU seconds of the distillation so far: resumable from a checkpoint's totals,
    and paused during periodic evaluations (they are not distillation cost)."""

    def __init__(self, wall_s: float = 0.0, cpu_s: float = 0.0):
        self._wall, self._cpu = wall_s, cpu_s
        self._t, self._c = time.time(), time.process_time()

    def wall(self) -> float:
        return self._wall + time.time() - self._t

    def cpu(self) -> float:
        return self._cpu + time.process_time() - self._c

    @contextlib.contextmanager
    def paused(self):
        t, c = time.time(), time.process_time()
        try:
            yield
        finally:
            self._t += time.time() - t
            self._c += time.process_time() - c


def _truncate_metrics(path: str, after: int) -> None:
    rows = fileio.read_jsonl(path)
    keep = [r for r in rows
            if not (r.get("phase") in DISTILL_PHASES and r.get("iteration", 0) > after)]
    if len(keep) != len(rows):
        fileio.write_jsonl(path, keep)


def _is_array(v) -> bool:
    return isinstance(v, (jax.Array, np.ndarray))


def checkpoint_tree(state: dict) -> dict:
    """The checkpointed form of a state: arrays as they are, any other entry (an optimiser
    state) as ``{"0": leaf, "1": leaf, ...}``; entries without leaves are left out."""
    out = {}
    for k, v in state.items():
        if _is_array(v):
            out[k] = v
        elif jax.tree.leaves(v):
            out[k] = {str(i): leaf for i, leaf in enumerate(jax.tree.leaves(v))}
    return out


def state_from_checkpoint(arrays: dict, like: dict) -> dict:
    """Inverse of :func:`checkpoint_tree`, shaped like ``like``."""
    out = {}
    for k, v in like.items():
        if _is_array(v):
            out[k] = jnp.asarray(arrays[k])
            continue
        leaves, treedef = jax.tree.flatten(v)
        out[k] = jax.tree.unflatten(
            treedef, [jnp.asarray(arrays[k][str(i)]) for i in range(len(leaves))]) if leaves else v
    return out


def _rel(workdir: str, step: int) -> str:
    """A checkpoint's name in the workdir's checksum manifest."""
    return os.path.relpath(os.path.join(workdir_lib.distill_checkpoints(workdir), str(step)),
                           workdir)


def _resume(ckpt, state: dict, workdir: str):
    """``(state, start, clock, examples)`` from the latest good checkpoint, or the initial ones.

    A checkpoint that is damaged, unreadable or not recorded is deleted (never used), so the
    iterations after the previous good one are recomputed, identically."""
    legacy = not integrity.has_records(workdir)  # made before checksums: trusted as before
    steps = ckpt.all_steps()
    for n, step in reversed(list(enumerate(steps))):
        why = None if legacy else integrity.problem(workdir, _rel(workdir, step))
        if why is None:
            try:
                arrays, payload = ckpt.restore(step, checkpoint_tree(state))
            except ValueError as e:  # the reader's error names the step again: keep its kind
                why = f"unreadable ({type(e.__cause__ or e).__name__})"
            else:
                start = int(payload["iteration"])
                _truncate_metrics(workdir_lib.metrics_path(workdir), start)
                clock = _Clock(float(payload["wall_s"]), float(payload.get("cpu_s", 0.0)))
                return state_from_checkpoint(arrays, state), start, clock, int(payload["examples"])
        since = f"iteration {steps[n - 1]}" if n else "the start"
        warnings.warn(f"distillation checkpoint {os.path.join(ckpt.directory, str(step))} is "
                      f"{why}; discarded, recomputing from {since}", RuntimeWarning, stacklevel=3)
        integrity.forget(workdir, _rel(workdir, step))
        ckpt.delete(step)
    _truncate_metrics(workdir_lib.metrics_path(workdir), 0)  # rows of an unsaved attempt
    return state, 0, _Clock(), 0


def _save(ckpt, workdir: str, done: int, state: dict, payload: dict) -> None:
    """Save the checkpoint of iteration ``done`` and record its digest; forget the records of
    the checkpoints the manager removed (``max_to_keep``)."""
    before = set(ckpt.all_steps())
    integrity.forget(workdir, _rel(workdir, done))  # a stale record must not vouch for it
    ckpt.save(done, checkpoint_tree(state), payload)
    integrity.record(workdir, _rel(workdir, done))
    for step in sorted(before - set(ckpt.all_steps())):
        integrity.forget(workdir, _rel(workdir, step))


def _host(info: dict) -> dict:
    return {k: v if isinstance(v, int) else float(v) for k, v in info.items()}


def run_distillation(config, method: DistillProgram, workdir: str, *,
                     log: Callable[..., None] = lambda **kw: None, evaluator=None,
                     progress: bool = True) -> LoopResult:
    """Run (or resume) ``config.distill.iterations`` iterations of ``method``.

    Args:
      config: full config (``seed``, ``distill``).
      method: the method (:func:`dp_jax.distill.mtt.build_method`, ``gm.build_method``, ...).
      workdir, log: checkpoints go to ``<workdir>/checkpoints/distill``; ``log`` is called with
        keyword metrics (one JSON line each in ``<workdir>/metrics.jsonl``).
      evaluator, progress: a :class:`~dp_jax.distill.evaluate.SetEvaluator` for periodic
        evaluation (optional); whether to show a progress bar (on a terminal).
    """
    d = config.distill
    total = int(d.iterations)
    k_eval = jax.random.fold_in(distill_key(config), rng.DISTILL_EVAL)
    ckpt = fileio.RoundCheckpointer(workdir_lib.distill_checkpoints(workdir), max_to_keep=2)
    try:
        state, start, clock, examples = _resume(ckpt, method.state, workdir)
        window: list[float] = []
        loss_f = float("nan")
        bar = tqdm(range(start, total), desc=f"distill ({method.name})", dynamic_ncols=True,
                   mininterval=1.0, disable=None if progress else True)
        for it in bar:
            state, loss, info = method.step(state, it)
            loss_f = float(loss)
            if not np.isfinite(loss_f):
                raise TrainingDivergedError(
                    f"distillation loss is not finite at iteration {it}; lower {method.hint}")
            examples += method.examples
            window.append(loss_f)
            done = it + 1
            if done % int(d.log_every) == 0 or done == total:
                lr_now = method.lr(state)
                log(phase="distill", iteration=done, loss=float(np.mean(window)),
                    loss_last=loss_f, lr=lr_now, **_host(info),
                    wall_s=clock.wall())
                bar.set_postfix_str(f"loss {np.mean(window):.4f} lr {lr_now:.4g}")
                window = []
            if evaluator is not None and d.eval_every and done % int(d.eval_every) == 0:
                xe, ye = synthetic.decode(state["images"], method.labels, method.factor)
                spent = {"distill_wall_s": clock.wall(), "distill_cpu_s": clock.cpu()}
                with clock.paused():  # the accuracy-vs-budget curve counts distillation only
                    res = evaluator.run(xe, ye, method.lr(state),
                                        jax.random.fold_in(k_eval, done),
                                        num_models=int(d.eval_periodic_models))
                log(phase="distill_eval", iteration=done, examples=examples, **spent, **res)
            if done % int(d.checkpoint_every) == 0 or done == total:
                _save(ckpt, workdir, done, state, {
                    "iteration": done, "wall_s": clock.wall(), "cpu_s": clock.cpu(),
                    "examples": examples})
        bar.close()
        wall, cpu = clock.wall(), clock.cpu()
    finally:
        ckpt.close()
    xe, ye = synthetic.decode(state["images"], method.labels, method.factor)
    return LoopResult(stored_images=np.asarray(state["images"]),
                      stored_labels=np.asarray(method.labels), images=np.asarray(xe),
                      labels=np.asarray(ye), lr=method.lr(state), iterations=total,
                      examples=examples, wall_s=wall, last_loss=loss_f, cpu_s=cpu)
