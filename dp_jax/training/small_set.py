"""Training on a small in-memory set: the one home of DP's inner loop, the random-subset
control's and the distilled-set evaluator's training.

*Schedule.* Step ``t`` takes minibatch ``t % S`` (``S = max(n // B, 1)`` passes per epoch, the
last partial batch dropped) of the permutation ``permutation(fold_in(fold_in(key, 0), t // S))``
(:func:`batch_at`), augments it with ``fold_in(fold_in(key, 1), t)`` and, with CutMix on, mixes
it with ``fold_in(fold_in(key, 2), t)``. A step depends only on (state, key, t): every loop
form (one ``lax.scan``, scanned chunks, jitted chunks driven from Python) takes identical steps.

*Recipe* (:class:`Recipe`, built from the ``dp`` section by :meth:`Recipe.from_dp`): SGD with
momentum and weight decay, a multistep schedule, a length in steps or in epochs over the set,
DSA, and CutMix (``cutmix_prob``, ``cutmix_beta``) as IDC trains on its condensed sets.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from dp_jax.training import optimizers
from dp_jax.training import trainer as train_lib
from dp_jax.training.settings import DPSettings
from dp_jax.data.cutmix import cutmix as cutmix_batch
from dp_jax.data.augment import make_augment

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How a small set is trained on (typed; hashable, so compiled programs can be cached)."""
    lr: float
    steps: int = 300              # optimiser steps (used when epochs == 0)
    epochs: int = 0               # > 0: epochs over the set instead of steps
    batch_size: int = 100         # clipped to the set size
    momentum: float = 0.9
    weight_decay: float = 5e-4
    decay_at: tuple = ()          # fractions of the run where lr is multiplied by decay_factor
    decay_factor: float = 0.1
    cutmix_prob: float = 0.0      # probability that a batch is CutMix-ed (0 = off)
    cutmix_beta: float = 1.0      # Beta(beta, beta) of the mixing ratio
    compute_dtype: str = "float32"  # forward/backward dtype (train.compute_dtype)

    @classmethod
    def from_dp(cls, dp_cfg: DPSettings, lr: float, compute_dtype: str = "float32") -> "Recipe":
        """The recipe of the ``dp`` settings, at step size ``lr``."""
        return cls(lr=float(lr), steps=int(dp_cfg.steps), epochs=int(dp_cfg.epochs),
                   compute_dtype=compute_dtype,
                   batch_size=int(dp_cfg.batch_size), momentum=float(dp_cfg.momentum),
                   weight_decay=float(dp_cfg.weight_decay), decay_at=tuple(dp_cfg.decay_at),
                   decay_factor=float(dp_cfg.decay_factor),
                   cutmix_prob=float(dp_cfg.cutmix_prob),
                   cutmix_beta=float(dp_cfg.cutmix_beta))

    def num_steps(self, n: int) -> int:
        """Optimiser steps on a set of ``n`` images."""
        if self.epochs:
            return int(self.epochs) * passes_per_epoch(n, self.batch_size)
        return int(self.steps)

    def batch(self, n: int) -> int:
        """The minibatch size on a set of ``n`` images."""
        return min(int(self.batch_size), int(n))

    def optimizer(self, n: int) -> optax.GradientTransformation:
        """SGD (momentum, weight decay, multistep schedule) over :meth:`num_steps`."""
        return sgd(self.lr, num_steps=self.num_steps(n), momentum=self.momentum,
                   weight_decay=self.weight_decay, decay_at=self.decay_at,
                   decay_factor=self.decay_factor)

    def examples(self, n: int) -> int:
        """Images one training run processes (steps x batch)."""
        return self.num_steps(n) * self.batch(n)


def sgd(lr, *, num_steps: int, momentum: float = 0.9, weight_decay: float = 5e-4,
        decay_at: tuple = (), decay_factor: float = 0.1) -> optax.GradientTransformation:
    """The small-set optimiser: SGD with momentum, coupled L2 weight decay (as
    ``torch.optim.SGD``) and lr x ``decay_factor`` at each fraction in ``decay_at``.

    ``lr`` may be traced (the distilled-set evaluator compiles one program for every step
    size); :func:`dp_jax.training.optimizers.sgd` on a multistep schedule.
    """
    if decay_at:
        sched = optax.piecewise_constant_schedule(
            lr, {int(round(f * num_steps)): float(decay_factor) for f in decay_at})
    else:
        sched = optax.constant_schedule(lr)
    return optimizers.sgd(sched, momentum=momentum, weight_decay=weight_decay)


def passes_per_epoch(n: int, batch_size: int) -> int:
    """Minibatches per epoch over ``n`` images (the last partial batch dropped; at least 1)."""
    return max(int(n) // min(int(batch_size), int(n)), 1)


def batch_at(key: jax.Array, t, n: int, batch_size: int) -> jax.Array:
    """Indices of step ``t``'s minibatch: without replacement within each epoch."""
    B = min(batch_size, n)
    S = passes_per_epoch(n, B)
    perm = jax.random.permutation(jax.random.fold_in(jax.random.fold_in(key, 0), t // S), n)
    return jax.lax.dynamic_slice_in_dim(perm, (t % S) * B, B)


def inner_step(model, tx, *, batch_size: int, augment: Optional[Callable] = None,
               cutmix: Optional[tuple] = None, compute_dtype: str = "float32") -> Callable:
    """One step on a small in-memory set: ``step(state, x, y, key, t)`` (see module doc).

    ``cutmix``: ``(prob, beta, num_classes)`` to CutMix each augmented batch.
    """
    def step(state, x, y, key, t):
        idx = batch_at(key, t, x.shape[0], batch_size)
        aug_key = jax.random.fold_in(jax.random.fold_in(key, 1), t)
        kw = dict(model=model, tx=tx, compute_dtype=compute_dtype)
        if cutmix is None:
            return train_lib.train_step(state, x[idx], y[idx], aug_key, augment=augment, **kw)
        xb = x[idx] if augment is None else augment(aug_key, x[idx])
        prob, beta, num_classes = cutmix
        xb, yb = cutmix_batch(jax.random.fold_in(jax.random.fold_in(key, 2), t), xb, y[idx],
                              num_classes, prob=prob, beta=beta)
        return train_lib.train_step(state, xb, yb, aug_key, **kw)
    return step


def make_inner_loop(model, tx, *, num_steps: int, batch_size: int,
                    augment: Optional[Callable] = None, unroll: int = 1,
                    chunk: int = 0, cutmix: Optional[tuple] = None,
                    compute_dtype: str = "float32") -> Callable:
    """Training on a small set as one compiled program (``lax.scan`` over :func:`inner_step`).

    The returned function is pure, so ``jax.vmap`` over ``key`` (and over ``variables``) runs
    several seeds in one program. ``unroll``: the scan's unroll factor; ``chunk`` > 0: scan
    over chunks of ``chunk`` fully-unrolled steps (XLA:CPU runs rolled scans over conv steps
    slowly).

    Returns:
      ``fn(variables, mask, x, y, key) -> (state, metrics)`` where ``metrics`` holds
      per-step arrays of length ``num_steps``.
    """
    step = inner_step(model, tx, batch_size=batch_size, augment=augment, cutmix=cutmix,
                      compute_dtype=compute_dtype)

    def fn(variables, mask, x, y, key):
        def body(state, t):
            return step(state, x, y, key, t)

        state = train_lib.create_state(variables, mask, tx)
        ts = jnp.arange(num_steps)
        if chunk and num_steps % chunk == 0:
            def chunk_body(s, tc):
                return jax.lax.scan(body, s, tc, unroll=True)
            state, m = jax.lax.scan(chunk_body, state, ts.reshape(-1, chunk))
            return state, jax.tree.map(lambda v: v.reshape(-1), m)
        return jax.lax.scan(body, state, ts, unroll=max(int(unroll), 1))
    return fn


def make_inner_python(model, tx, *, num_steps: int, batch_size: int,
                      augment: Optional[Callable] = None, chunk: int = 0,
                      cutmix: Optional[tuple] = None, compute_dtype: str = "float32") -> Callable:
    """:func:`make_inner_loop` for several seeds, driven from Python one jitted chunk at a time.

    The program is ``chunk`` (default 1) unrolled steps vmapped over the seeds; Python calls
    it ``num_steps / chunk`` times with the state donated: the fast form for conv nets on
    XLA:CPU (docs/performance.md). Same steps as the scan form.

    Returns:
      ``fn(variables, mask, x, y, keys) -> (state, metrics)`` with a leading seed axis on
      the state and on the ``(seeds, num_steps)`` metrics.
    """
    c = chunk if chunk and num_steps % chunk == 0 else 1
    step = inner_step(model, tx, batch_size=batch_size, augment=augment, cutmix=cutmix,
                      compute_dtype=compute_dtype)

    def steps(state, x, y, key):
        ms = []
        for _ in range(c):  # unrolled: c is small and static
            # The step index is the state's own (on the device): the host passes no scalar.
            state, m = step(state, x, y, key, state.step)
            ms.append(m)
        return state, jax.tree.map(lambda *v: jnp.stack(v), *ms)

    program = jax.jit(jax.vmap(steps, in_axes=(0, None, None, 0)), donate_argnums=0)
    init = jax.jit(jax.vmap(lambda v, m, k: train_lib.create_state(v, m, tx),
                            in_axes=(None, None, 0)))

    def fn(variables, mask, x, y, keys):
        state = init(variables, mask, keys)
        ms = []
        for _ in range(0, num_steps, c):
            state, m = program(state, x, y, keys)
            ms.append(m)
        return state, jax.tree.map(lambda *v: jnp.concatenate(v, axis=1), *ms)
    return fn


def make_inner_train(model, recipe: Recipe, n: int, augment, *, loop: str = "scan",
                     unroll: int = 1, chunk: int = 0, num_classes: int = 0) -> Callable:
    """DP's inner loop on a set of ``n`` images, compiled once, vmapped over inner seeds.

    ``loop``: ``scan`` (one program) or ``python`` (jitted chunks of ``chunk`` steps); both
    take identical steps. ``num_classes`` is needed when the recipe uses CutMix.

    Returns ``fn(variables, mask, x, y, keys) -> (params, final_loss)`` where ``keys`` has one
    key per inner seed; the params of every seed are returned (leading axis).
    """
    tx = recipe.optimizer(n)
    steps = recipe.num_steps(n)
    mix = (recipe.cutmix_prob, recipe.cutmix_beta, int(num_classes)) \
        if recipe.cutmix_prob > 0 else None
    if loop == "python":
        run = make_inner_python(model, tx, num_steps=steps, batch_size=recipe.batch_size,
                                augment=augment, chunk=chunk, cutmix=mix,
                                compute_dtype=recipe.compute_dtype)

        def run_python(variables, mask, x, y, keys):
            state, metrics = run(variables, mask, x, y, keys)
            return state.params, _last_loss(metrics["loss"])
        return run_python
    body = make_inner_loop(model, tx, num_steps=steps, batch_size=recipe.batch_size,
                           augment=augment, unroll=unroll, chunk=chunk, cutmix=mix,
                           compute_dtype=recipe.compute_dtype)

    def fn(variables, mask, x, y, keys):
        state, metrics = jax.vmap(body, in_axes=(None, None, None, None, 0))(
            variables, mask, x, y, keys)
        return state.params, metrics["loss"][:, -1]
    return jax.jit(fn)


@jax.jit
def _last_loss(loss: jax.Array) -> jax.Array:
    """Each seed's loss at the last step (jitted: an eager slice would copy its bounds)."""
    return loss[:, -1]


_PROGRAMS: dict = {}


def setup_inner_train(setup, dp_cfg: DPSettings, lr: float, n: int) -> Callable:
    """DP's (or the subset control's) inner loop for ``setup``'s model on ``n`` images at
    step size ``lr``, from the ``dp`` section; cached per (model, shape, recipe, loop form)."""
    recipe = Recipe.from_dp(dp_cfg, lr, compute_dtype=setup.trainer.compute_dtype)
    loop = dp_cfg.loop
    if loop == "auto":
        like = jax.eval_shape(setup.init_fn, jax.random.key(0))["params"]
        loop = train_lib.resolve_loop("auto", like, setup.model, setup.image_shape)
    key = (setup.model, tuple(setup.image_shape), recipe, int(n), loop, dp_cfg.augment,
           int(dp_cfg.unroll), int(dp_cfg.chunk), int(setup.num_classes))
    if key not in _PROGRAMS:
        _PROGRAMS[key] = make_inner_train(
            setup.model, recipe, n, make_augment(dp_cfg.augment), loop=loop,
            unroll=int(dp_cfg.unroll), chunk=int(dp_cfg.chunk),
            num_classes=setup.num_classes)
    return _PROGRAMS[key]
