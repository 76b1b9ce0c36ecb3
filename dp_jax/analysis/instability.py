"""Instability / linear mode connectivity (Frankle et al. 2020) of masked networks.

From one (masked) starting point -- weights, mask and the global step ``k`` they
belong to -- ``P >= 2`` copies are trained with different data order (and
augmentation) keys: one compiled step ``vmap``-ped over copies (built on
:func:`dp_jax.training.trainer.train_step`), driven either by a ``lax.scan`` per epoch or
by a Python loop (XLA:CPU runs rolled scans over conv steps ~10x slower).

Copy 0 uses the seed's own data key (``fold_in(seed, rng.DATA)``), so it
retraces the training that produced the run's recorded accuracy; copies
``c >= 1`` use ``fold_in(fold_in(seed, rng.ANALYSIS), rng.ANALYSIS_COPIES, c)``. Every mask of a
seed therefore sees the same SGD noise.

Test error and loss are then evaluated on ``theta(alpha) = (1 - alpha) theta_1 +
alpha theta_2`` for an alpha grid as one program vmapped over alpha
(:class:`dp_jax.analysis.family.FamilyEvaluator`); the error barrier is
``max_alpha err(alpha) - (err(0) + err(1)) / 2`` (the loss barrier likewise), and
a network is called stable when the error barrier is below 2 percentage points.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dp_jax import masks as masks_lib
from dp_jax import rng
from dp_jax.training import trainer as train_lib
from dp_jax.analysis import family
from dp_jax.training.outputs import TrainingDivergedError

PyTree = Any

STABLE_BARRIER = 0.02


def analysis_key(seed: int, purpose: int) -> jax.Array:
    """The seed's analysis key for ``purpose`` (one of the sub-purposes above)."""
    return rng.key_for(seed, rng.ANALYSIS, purpose)


def copy_keys(seed: int, num_copies: int) -> jax.Array:
    """Data-order keys ``(P,)``: copy 0 = the seed's data key, others from the analysis stream."""
    if num_copies < 2:
        raise ValueError(f"instability needs at least 2 copies, got {num_copies}")
    first = rng.key_for(seed, rng.DATA)
    copies = analysis_key(seed, rng.ANALYSIS_COPIES)
    rest = [jax.random.fold_in(copies, c) for c in range(1, num_copies)]
    return jnp.stack([first] + rest)


class CopyTrainer:
    """Trains ``P`` copies of a masked network at once; build once, reuse for every start point.

    Copy ``c`` follows exactly the batch schedule of :class:`dp_jax.training.trainer.Trainer`
    with key ``keys[c]`` (epoch permutation ``permutation(fold_in(key, epoch))``,
    step key ``fold_in(key, step)``), so a copy with the run's data key retraces
    the run.

    Args:
      model, tx: the model and optimiser (as in the experiment's setup).
      batch_size, num_train: minibatch size and training-set size.
      loop: ``"scan"`` (one program per epoch: a fixed-length scan whose unused
        steps are skipped by ``lax.cond``, so any start step reuses it) or
        ``"python"`` (a jitted vmapped step per call).
      augment: optional ``augment(key, x) -> x`` applied inside the step.
      unroll: ``lax.scan`` unroll factor for ``"scan"``.
    """

    def __init__(self, model, tx, *, batch_size: int, num_train: int, loop: str = "scan",
                 augment: Optional[Callable] = None, unroll: int = 1):
        if loop not in ("scan", "python"):
            raise ValueError(f"CopyTrainer loop must be 'scan' or 'python', got {loop!r}")
        if batch_size > num_train:
            raise ValueError(f"batch_size={batch_size} exceeds the {num_train} training examples")
        self.tx, self.loop = tx, loop
        self.batch_size, self.num_train = int(batch_size), int(num_train)
        self.steps_per_epoch = self.num_train // self.batch_size
        step = functools.partial(train_lib.train_step, model=model, tx=tx, augment=augment)
        B, S = self.batch_size, self.steps_per_epoch

        def one(state, x, y, perm, i, key):
            idx = jax.lax.dynamic_slice_in_dim(perm, i * B, B)
            return step(state, x[idx], y[idx], jax.random.fold_in(key, state.step))

        # Copies are the mapped axis; the data and the position in the epoch are shared.
        vone = jax.vmap(one, in_axes=(0, None, None, 0, None, 0))

        def segment(state, x, y, perms, i0, n_active, keys):
            def body(s, j):
                def run(s):
                    s, m = vone(s, x, y, perms, i0 + j, keys)
                    return s, (m["loss"], m["accuracy"])

                def skip(s):
                    z = jnp.zeros(s.step.shape, jnp.float32)
                    return s, (z, z)
                return jax.lax.cond(j < n_active, run, skip, s)
            return jax.lax.scan(body, state, jnp.arange(S), unroll=max(int(unroll), 1))

        self._vstep = jax.jit(vone, donate_argnums=0)
        self._segment = jax.jit(segment, donate_argnums=0)
        n = self.num_train
        self._perms = jax.jit(lambda keys, e: jax.vmap(
            lambda k: jax.random.permutation(jax.random.fold_in(k, e), n))(keys))

    def init(self, variables: dict, mask: PyTree, num_copies: int, start_step: int):
        """``P`` identical states at global step ``start_step`` (fresh optimiser state)."""
        state = train_lib.create_state(variables, mask, self.tx, start_step=start_step)
        return jax.tree.map(lambda a: jnp.repeat(jnp.asarray(a)[None], num_copies, axis=0), state)

    def train(self, state, x, y, keys: jax.Array, num_steps: int):
        """Train the stacked ``state`` (from its step) to global step ``num_steps``.

        Returns:
          ``(state, metrics)``; ``metrics`` holds each copy's mean loss and
          accuracy over its last epoch of training.
        """
        S = self.steps_per_epoch
        t = int(np.asarray(state.step)[0])
        last = None
        while t < num_steps:
            epoch = t // S
            stop = min((epoch + 1) * S, num_steps)
            perms = self._perms(keys, epoch)
            i0, n_active = t - epoch * S, stop - t
            if self.loop == "scan":
                state, (loss, acc) = self._segment(state, x, y, perms, jnp.int32(i0),
                                                   jnp.int32(n_active), keys)
                loss, acc = np.asarray(loss)[:n_active], np.asarray(acc)[:n_active]
            else:
                ms = []
                for i in range(i0, i0 + n_active):
                    state, m = self._vstep(state, x, y, perms, jnp.int32(i), keys)
                    ms.append((m["loss"], m["accuracy"]))
                host = jax.device_get(ms)
                loss = np.stack([h[0] for h in host])
                acc = np.stack([h[1] for h in host])
            if not np.all(np.isfinite(loss)):
                bad = t + int(np.flatnonzero(~np.all(np.isfinite(loss), axis=1))[0])
                raise TrainingDivergedError(
                    f"a copy's loss is not finite at step {bad} (steps {t}-{stop}); "
                    "lower train.lr or check the data")
            last = {"loss": loss.mean(0).tolist(), "accuracy": acc.mean(0).tolist()}
            t = stop
        return state, (last or {})


def spawn_copies(trainer: CopyTrainer, variables: dict, mask: PyTree, keys: jax.Array, x, y, *,
                 start_step: int, num_steps: int) -> tuple[list[dict], dict]:
    """Train ``len(keys)`` copies of ``variables`` under ``mask`` from ``start_step``.

    Returns:
      ``(copies, metrics)``: a list of ``{"params", "batch_stats"}`` (one per
      copy) and the copies' last-epoch training metrics.
    """
    state = trainer.init(variables, mask, int(keys.shape[0]), start_step)
    state, metrics = trainer.train(state, x, y, keys, num_steps)
    copies = [{"params": family.unstack(state.params, c),
               "batch_stats": family.unstack(state.batch_stats, c)}
              for c in range(int(keys.shape[0]))]
    return copies, metrics


def interpolation_coeffs(alphas: Sequence[float]) -> np.ndarray:
    """``(G, 2)`` coefficients ``(1 - alpha, alpha)``."""
    a = np.asarray(alphas, np.float32)
    return np.stack([1 - a, a], axis=1)


def barrier(alphas: Sequence[float], values: Sequence[float]) -> float:
    """``max_{alpha in [0, 1]} v(alpha) - (v(0) + v(1)) / 2``; the grid must contain 0 and 1."""
    a = np.asarray(alphas, np.float64)
    v = np.asarray(values, np.float64)
    if a.shape != v.shape:
        raise ValueError(f"alphas {a.shape} and values {v.shape} differ in shape")
    i0, i1 = _endpoints(a)
    inside = (a >= -1e-9) & (a <= 1 + 1e-9)
    return float(v[inside].max() - 0.5 * (v[i0] + v[i1]))


def _endpoints(alphas) -> tuple[int, int]:
    a = np.asarray(alphas, np.float64)
    i0, i1 = np.flatnonzero(np.isclose(a, 0.0)), np.flatnonzero(np.isclose(a, 1.0))
    if not i0.size or not i1.size:
        raise ValueError("the alpha grid must contain 0 and 1 to define a barrier")
    return int(i0[0]), int(i1[0])


def interpolate(evaluator: family.FamilyEvaluator, a: dict, b: dict, mask: PyTree, x, y, *,
                alphas: Sequence[float], bn_mode: str = "interpolate", bn_batches=None,
                sel: Optional[dict] = None, batches=None) -> dict:
    """Error and loss along ``(1 - alpha) a + alpha b`` and their barriers.

    Args:
      evaluator: a :class:`~dp_jax.analysis.family.FamilyEvaluator` for the model.
      a, b: ``{"params", "batch_stats"}`` of the two endpoints.
      mask: the pruning mask shared by both.
      x, y: evaluation data (the test set).
      alphas: the grid (must contain 0 and 1).
      bn_mode: ``"interpolate"`` or ``"recompute"`` BatchNorm statistics.
      bn_batches: training batches for ``"recompute"``.
      sel: optional per-leaf selector (layer-wise interpolation).
      batches: optional precomputed padded test batches.

    Returns:
      ``{"alphas", "error", "loss", "barrier", "loss_barrier"}``.
    """
    anchors = family.stack([a, b])
    out = evaluator.evaluate(anchors, interpolation_coeffs(alphas), mask, x, y, sel=sel,
                             bn_mode=bn_mode, bn_batches=bn_batches, batches=batches)
    alphas = [float(v) for v in alphas]
    return {"alphas": alphas, "error": out["error"].tolist(), "loss": out["loss"].tolist(),
            "barrier": barrier(alphas, out["error"]),
            "loss_barrier": barrier(alphas, out["loss"])}


def layerwise(evaluator: family.FamilyEvaluator, a: dict, b: dict, mask: PyTree, x, y, *,
              alphas: Sequence[float], bn_mode: str = "interpolate", bn_batches=None,
              batches=None) -> dict:
    """Interpolate one layer at a time (every other layer stays at ``a``).

    Layers are the parameter-owning modules (a BatchNorm layer's statistics move
    with its scale and offset). The same compiled program serves every layer.

    Returns:
      ``{layer: {"error", "loss", "barrier", "loss_barrier"}}``.
    """
    out = {}
    for layer in family.layer_names(a["params"]):
        sel = {"params": family.layer_selector(a["params"], layer),
               "batch_stats": family.layer_selector(a.get("batch_stats", {}), layer)}
        r = interpolate(evaluator, a, b, mask, x, y, alphas=alphas, bn_mode=bn_mode,
                        bn_batches=bn_batches, sel=sel, batches=batches)
        out[layer] = {k: r[k] for k in ("error", "loss", "barrier", "loss_barrier")}
    return out


@jax.jit
def _distances(a: PyTree, b: PyTree):
    """``(|a - b|, |a|, |b|, {leaf path: sum (a - b)^2})`` as one program."""
    diff = jax.tree.map(jnp.subtract, a, b)
    sq = {masks_lib.path_str(p): jnp.sum(v ** 2)
          for p, v in jax.tree_util.tree_flatten_with_path(diff)[0]}
    return optax.tree.norm(diff), optax.tree.norm(a), optax.tree.norm(b), sq


def l2_distance(a: PyTree, b: PyTree) -> dict:
    """Euclidean distance between two parameter pytrees, absolute, relative and per layer.

    ``relative`` divides by the mean of the two norms.
    """
    d, na, nb, sq = jax.device_get(_distances(a, b))  # one read for every figure
    d, na, nb = float(d), float(na), float(nb)
    per_layer = {}
    for k, v in sq.items():
        m = family.module_of(k)
        per_layer[m] = per_layer.get(m, 0.0) + float(v)
    return {"l2": d, "relative": d / max(0.5 * (na + nb), 1e-12),
            "by_layer": {k: float(np.sqrt(v)) for k, v in per_layer.items()}}


def analyze_copies(evaluator: family.FamilyEvaluator, copies: list[dict], mask: PyTree, x, y, *,
                   alphas: Sequence[float], bn_modes: Sequence[str] = ("interpolate",),
                   bn_batches=None, with_layerwise: bool = True, batches=None) -> dict:
    """Instability of trained copies: every pair's interpolation, barriers and distances.

    The headline fields (``error``, ``loss``, ``barrier``, ``loss_barrier``) are
    for the first BatchNorm mode in ``bn_modes``: the curves are averaged over
    pairs and the barriers are the mean of the pairs' barriers. Models without
    BatchNorm are evaluated once (``bn_mode`` is then ``"none"``). ``batches``
    optionally passes precomputed padded test batches (:func:`family.pad_batches`).

    Returns:
      A JSON-able dict (see docs/analysis.md).
    """
    has_bn = bool(copies[0].get("batch_stats"))
    modes = list(bn_modes) if has_bn else ["interpolate"]
    if batches is None:
        batches = family.pad_batches(x, y, evaluator.eval_batch_size)
    pairs = list(itertools.combinations(range(len(copies)), 2))
    by_mode = {}
    for mode in modes:
        per_pair = [interpolate(evaluator, copies[i], copies[j], mask, x, y, alphas=alphas,
                                bn_mode=mode, bn_batches=bn_batches, batches=batches)
                    for i, j in pairs]
        by_mode[mode] = {
            "error": np.mean([p["error"] for p in per_pair], 0).tolist(),
            "loss": np.mean([p["loss"] for p in per_pair], 0).tolist(),
            "barrier": float(np.mean([p["barrier"] for p in per_pair])),
            "barrier_std": float(np.std([p["barrier"] for p in per_pair])),
            "loss_barrier": float(np.mean([p["loss_barrier"] for p in per_pair])),
            "pairs": [dict(p, copies=[i, j]) for p, (i, j) in zip(per_pair, pairs)],
        }
    head = by_mode[modes[0]]
    out = {"alphas": [float(a) for a in alphas], "bn_mode": modes[0] if has_bn else "none",
           "copies": len(copies), **{k: head[k] for k in
                                     ("error", "loss", "barrier", "barrier_std", "loss_barrier")},
           "stable": bool(head["barrier"] < STABLE_BARRIER), "pairs": head["pairs"]}
    # Each copy's own test error/loss (alpha = 0 or 1 of a pair), preferably with
    # its own running statistics: that is the network as trained and recorded.
    i0, i1 = _endpoints(alphas)
    own = "interpolate" if "interpolate" in by_mode else modes[0]
    out["copy_test_bn"] = own if has_bn else "none"
    for key in ("error", "loss"):
        vals = {}
        for p in by_mode[own]["pairs"]:
            vals.setdefault(p["copies"][0], p[key][i0])
            vals.setdefault(p["copies"][1], p[key][i1])
        out[f"copy_test_{key}"] = [vals[c] for c in range(len(copies))]
    out["l2_distance"] = [dict(l2_distance(copies[i]["params"], copies[j]["params"]),
                               copies=[i, j]) for i, j in pairs]
    if has_bn:
        out["bn_modes"] = {m: {k: v for k, v in r.items() if k != "pairs"}
                           for m, r in by_mode.items()}
    if with_layerwise:
        out["layerwise"] = layerwise(evaluator, copies[0], copies[1], mask, x, y, alphas=alphas,
                                     bn_mode=modes[0], bn_batches=bn_batches, batches=batches)
    return out


def dense_snapshots(trainer: train_lib.Trainer, tx, variables: dict, x, y, key: jax.Array,
                    steps: Sequence[int]) -> dict[int, dict]:
    """Train the dense network once to ``max(steps)`` and keep its weights at each step.

    Uses the experiment's own compiled trainer and data key, so the trajectory is
    the seed's dense training. Step 0 is ``variables`` itself.

    Returns:
      ``{step: {"params", "batch_stats"}}``.
    """
    steps = sorted({int(s) for s in steps})
    out = {}
    if 0 in steps:
        out[0] = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    later = [s for s in steps if s > 0]
    if later:
        state = train_lib.create_state(variables, masks_lib.ones_like(variables["params"]), tx)
        _, snaps = trainer.train(state, x, y, key, max(later), snapshot_steps=later)
        out.update(snaps)
    return out
