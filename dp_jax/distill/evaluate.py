"""Evaluating a distilled set: train fresh networks on it, test them on the real test set.

Protocol (MTT's): K networks from fresh inits train on the small set with SGD (momentum 0.9,
weight decay 5e-4, learning rate = the learned step size, x0.1 at half of training) for
``eval_epochs`` passes with DSA, then are tested on the real test set; the result is mean +- std
over the K networks. The same protocol runs on a class-balanced random real subset of equal size
(the baseline the distilled set must beat) and a short real-data training on the full training
set (the ceiling).

Training on the small set uses :func:`dp_jax.training.small_set.make_inner_loop` (one ``lax.scan``,
optionally ``vmap``-ped over the K seeds). The step size is a traced argument of the compiled
program (the optimiser is built inside it), so evaluating a new learned step size never
recompiles. XLA:CPU runs convolution steps inside a ``lax.scan`` 10-30x slower than as separate
programs, so for conv nets on CPU (``loop='auto'``) the same steps, with the same minibatch and
augmentation keys, are dispatched one jitted step at a time instead.

Seed ``i`` of an evaluation with key ``k`` initialises from ``fold_in(fold_in(k, i), 0)`` and
draws minibatches/augmentation from ``fold_in(fold_in(k, i), 1)``.
"""

from __future__ import annotations

import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dp_jax.training import optimizers
from dp_jax import masks as masks_lib
from dp_jax import rng
from dp_jax.training import small_set
from dp_jax.training import trainer as train_lib
from dp_jax.data import stratified_indices
from dp_jax.data.augment import make_augment
from dp_jax.models import create_model, init_variables

PyTree = Any


def eval_tx(lr, *, num_steps: int, momentum: float = 0.9, weight_decay: float = 5e-4,
            decay_at: float = 0.5, decay_factor: float = 0.1) -> optax.GradientTransformation:
    """The evaluation protocol's optimiser (lr x0.1 at half by default); ``lr`` may be traced."""
    return small_set.sgd(lr, num_steps=num_steps, momentum=momentum, weight_decay=weight_decay,
                         decay_at=(decay_at,), decay_factor=decay_factor)


class SetEvaluator:
    """Train-on-a-small-set / test-on-real evaluation, compiled once per set size.

    Args:
      model: Flax model to train.
      image_shape: (H, W, C).
      epochs: passes over the small set.
      batch_size: minibatch size (clipped to the set size).
      augment: name for :func:`dp_jax.data.augment.make_augment` ('dsa', 'none', ...).
      x_test, y_test: the real test set.
      loop: 'auto' | 'scan' | 'python'.
      vmap: train the K networks in one vmapped program (scan loop only).
      momentum, weight_decay: optimiser settings.
      unroll: scan unroll factor.
      eval_batch_size: test batch size.
    """

    def __init__(self, model, *, image_shape, epochs: int, batch_size: int, augment: str,
                 x_test, y_test, loop: str = "auto", vmap: bool = False, momentum: float = 0.9,
                 weight_decay: float = 5e-4, unroll: int = 1, eval_batch_size: int = 1000):
        self.model, self.image_shape = model, tuple(image_shape)
        self.epochs, self.batch_size = int(epochs), int(batch_size)
        self.augment = make_augment(augment)
        self.momentum, self.weight_decay = float(momentum), float(weight_decay)
        self.unroll = int(unroll)
        like = jax.eval_shape(lambda k: init_variables(model, k, self.image_shape),
                              jax.random.key(0))
        self.loop = train_lib.resolve_loop(loop, like["params"], model, self.image_shape)
        self.vmap = bool(vmap) and self.loop == "scan"
        self.x_test, self.y_test = jnp.asarray(x_test), jnp.asarray(y_test)
        self._init = jax.jit(lambda k: init_variables(model, k, self.image_shape))
        n_test = int(self.y_test.shape[0])
        self.eval_batch_size = min(int(eval_batch_size), n_test)
        self._programs: dict = {}

    def _steps(self, n: int) -> tuple[int, int]:
        b = min(self.batch_size, n)
        return b, self.epochs * small_set.passes_per_epoch(n, b)

    def _scan_program(self, n: int):
        b, steps = self._steps(n)

        def train_one(variables, mask, x, y, key, lr):
            tx = eval_tx(lr, num_steps=steps, momentum=self.momentum,
                         weight_decay=self.weight_decay)
            fn = small_set.make_inner_loop(self.model, tx, num_steps=steps, batch_size=b,
                                           augment=self.augment, unroll=self.unroll)
            state, m = fn(variables, mask, x, y, key)
            return state, m["loss"][-1]
        if self.vmap:
            return jax.jit(jax.vmap(train_one, in_axes=(0, None, None, None, 0, None)))
        return jax.jit(train_one)

    def _python_program(self, n: int):
        b, steps = self._steps(n)

        def one(state, x, y, t, key, lr):
            # The steps of make_inner_loop (same minibatch and augmentation keys).
            tx = eval_tx(lr, num_steps=steps, momentum=self.momentum,
                         weight_decay=self.weight_decay)
            return small_set.inner_step(self.model, tx, batch_size=b,
                                        augment=self.augment)(state, x, y, key, t)

        step = jax.jit(one, donate_argnums=0)
        tx0 = eval_tx(1.0, num_steps=steps, momentum=self.momentum,
                      weight_decay=self.weight_decay)

        def train_one(variables, mask, x, y, key, lr):
            state = train_lib.create_state(variables, mask, tx0)  # opt state is lr-free
            loss = None
            for t in range(steps):
                state, m = step(state, x, y, jnp.int32(t), key, lr)
                loss = m["loss"]
            return state, loss
        return train_one

    def run(self, x, y, lr: float, key: jax.Array, *, num_models: int,
            mask: Optional[PyTree] = None) -> dict:
        """Train ``num_models`` fresh networks on ``(x, y)`` with step size ``lr`` and test them.

        Returns ``{"accuracy_mean", "accuracy_std", "accuracies", "losses", "final_train_loss",
        "wall_s"}``.
        """
        t0 = time.time()
        x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32)
        n = int(x.shape[0])
        kind = (n, self.loop, self.vmap)
        if kind not in self._programs:
            self._programs[kind] = (self._scan_program(n) if self.loop == "scan"
                                    else self._python_program(n))
        program = self._programs[kind]
        seeds = [jax.random.fold_in(key, i) for i in range(int(num_models))]
        inits = [self._init(jax.random.fold_in(k, 0)) for k in seeds]
        data_keys = [jax.random.fold_in(k, 1) for k in seeds]
        if mask is None:
            mask = masks_lib.ones_like(inits[0]["params"])
        lr = jnp.float32(lr)
        if self.vmap:
            stacked = jax.tree.map(lambda *a: jnp.stack(a), *inits)
            states, losses = program(stacked, mask, x, y, jnp.stack(data_keys), lr)
            trained = [jax.tree.map(lambda a, i=i: a[i], states) for i in range(len(seeds))]
            losses = list(np.asarray(losses))
        else:
            trained, losses = [], []
            for v, k in zip(inits, data_keys):
                s, l = program(v, mask, x, y, k, lr)
                trained.append(s)
                losses.append(float(l))
        accs, test_losses = [], []
        for s in trained:
            ev = train_lib.evaluate(self.model, s.params, s.batch_stats, s.mask, self.x_test,
                                    self.y_test, batch_size=self.eval_batch_size)
            accs.append(ev["accuracy"])
            test_losses.append(ev["loss"])
        return {"accuracy_mean": float(np.mean(accs)), "accuracy_std": float(np.std(accs)),
                "accuracies": [float(a) for a in accs], "losses": [float(l) for l in test_losses],
                "final_train_loss": float(np.mean(losses)), "wall_s": time.time() - t0}


def make_evaluator(config, dataset, *, epochs: Optional[int] = None) -> SetEvaluator:
    """A :class:`SetEvaluator` from ``config.distill`` eval settings and ``config.model``."""
    d = config.distill
    model = create_model(config.model, num_classes=dataset.num_classes)
    return SetEvaluator(model, image_shape=dataset.image_shape,
                        epochs=int(epochs or d.eval_epochs), batch_size=int(d.eval_batch_size),
                        augment=d.eval_augment, x_test=dataset.x_test, y_test=dataset.y_test,
                        loop=d.eval_loop, vmap=bool(d.eval_vmap), momentum=float(d.eval_momentum),
                        weight_decay=float(d.eval_weight_decay),
                        eval_batch_size=int(config.train.eval_batch_size))


def random_subset(dataset, size: int, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A class-balanced random real subset of ``size`` training examples."""
    idx = stratified_indices(dataset.y_train, size, num_classes=dataset.num_classes, seed=seed)
    return dataset.x_train[idx], dataset.y_train[idx]


def full_data_baseline(config, dataset, key: jax.Array, *, num_models: int,
                       epochs: int) -> dict:
    """Short real-data training on the full training set with ``config.train``'s optimiser."""
    t0 = time.time()
    model = create_model(config.model, num_classes=dataset.num_classes)
    n = len(dataset.y_train)
    cfg = config.train
    batch = min(int(cfg.batch_size), n)
    steps = train_lib.total_steps(epochs, n, batch)
    tx = optimizers.make_optimizer(cfg, steps)
    like = jax.eval_shape(lambda k: init_variables(model, k, dataset.image_shape),
                          jax.random.key(0))
    trainer = train_lib.Trainer(model, tx, batch_size=batch, num_train=n,
                                loop=train_lib.resolve_loop(cfg.loop, like["params"], model,
                                                             dataset.image_shape),
                                unroll=cfg.unroll, eval_batch_size=int(cfg.eval_batch_size))
    x, y = jnp.asarray(dataset.x_train), jnp.asarray(dataset.y_train)
    xt, yt = jnp.asarray(dataset.x_test), jnp.asarray(dataset.y_test)
    accs = []
    for i in range(int(num_models)):
        k = jax.random.fold_in(key, i)
        v = init_variables(model, jax.random.fold_in(k, 0), dataset.image_shape)
        state = train_lib.create_state(v, masks_lib.ones_like(v["params"]), tx)
        state, _ = trainer.train(state, x, y, jax.random.fold_in(k, 1), steps)
        accs.append(trainer.evaluate(state.params, state.batch_stats, state.mask, xt,
                                     yt)["accuracy"])
    return {"accuracy_mean": float(np.mean(accs)), "accuracy_std": float(np.std(accs)),
            "accuracies": accs, "epochs": int(epochs), "examples": int(steps * batch * num_models),
            "wall_s": time.time() - t0}



# The purposes under a distillation's evaluation key (``rng.DISTILL_EVAL``): the distilled set is
# evaluated with purpose 0 (tasks/distill.py; 1 and 3 are its random subsets, 2 the full data).
DISTILLED_SET_EVAL = 0


def set_eval_key(seed: int) -> jax.Array:
    """The key the distillation of seed ``seed`` evaluates its distilled set with: network ``i``
    of the K starts from ``fold_in(fold_in(key, i), 0)`` and draws its minibatches and
    augmentation from ``fold_in(fold_in(key, i), 1)`` (:meth:`SetEvaluator.run`). A real subset
    evaluated with it trains the very networks (inits, minibatch and augmentation keys) the
    distilled set trained."""
    return rng.key_for(int(seed), rng.DISTILL, rng.DISTILL_EVAL, DISTILLED_SET_EVAL)


def evaluate_subset(evaluator: SetEvaluator, dataset, indices, lr: float, key: jax.Array, *,
                    num_models: int) -> dict:
    """:meth:`SetEvaluator.run` on the real training images ``indices`` of ``dataset``."""
    idx = np.asarray(indices, np.int64)
    return evaluator.run(np.asarray(dataset.x_train)[idx], np.asarray(dataset.y_train)[idx], lr,
                         key, num_models=num_models)
