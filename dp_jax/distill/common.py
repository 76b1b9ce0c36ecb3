"""What every distillation method shares: the interface the loop runs, the initial synthetic
images, per-class real batches, optimisers and the network's forward and training steps.

A method (MTT in ``mtt.py``, gradient matching in ``gm.py``, distribution matching in ``dm.py``)
is a :class:`DistillProgram`: a state pytree (the stored images plus whatever else it optimises) and a
step ``(state, it) -> (state, loss, info)`` that depends only on the state and the iteration
number, so that :func:`dp_jax.distill.loop.run_distillation` can checkpoint, resume, log and evaluate
every method the same way.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dp_jax import masks as masks_lib
from dp_jax import rng
from dp_jax.training import small_set
from dp_jax.data.augment import make_augment, siamese
from dp_jax.distill import synthetic
from dp_jax.distill.experts import distill_key
from dp_jax.models import apply_features, init_variables
from dp_jax.models import create_model

PyTree = Any


@dataclasses.dataclass
class DistillProgram:
    """A distillation method as the shared loop runs it.

    Attributes:
      name: ``'mtt'``, ``'gm'`` or ``'dm'``.
      state: dict pytree of arrays; ``state["images"]`` holds the stored images. Entries that
        are not arrays (optimiser states) are checkpointed leaf by leaf.
      step: ``step(state, it) -> (state, loss, info)``; ``loss`` a scalar array (the one value
        read back every iteration), ``info`` maps metric names to ints or scalar arrays, read
        only when a metrics row is written.
      lr: ``lr(state) -> float``, the step size the set is evaluated and saved with.
      labels: the stored labels.
      factor: multi-formation factor (``synthetic.decode``).
      examples: examples processed per iteration (cost accounting).
      hint: the fields to lower when the loss diverges (for the error message).
    """
    name: str
    state: dict
    step: Callable[[dict, int], tuple]
    lr: Callable[[dict], float]
    labels: jax.Array
    factor: int
    examples: int
    hint: str


@functools.lru_cache(maxsize=16)
def sgd(lr: float, momentum: float) -> optax.GradientTransformation:
    """Plain SGD from :func:`dp_jax.training.small_set.sgd` (no weight decay or schedule; no momentum
    state when ``momentum`` is 0); one object per setting, because jitted updates take the
    optimiser as a static argument."""
    return small_set.sgd(lr, num_steps=0, momentum=momentum, weight_decay=0.0)


def initial_images(config, dataset) -> tuple[jax.Array, jax.Array]:
    """The stored images and labels every method starts from (``distill.init``, key purpose
    ``DISTILL_SYN_INIT``)."""
    d = config.distill
    k = jax.random.fold_in(distill_key(config), rng.DISTILL_SYN_INIT)
    images, labels = synthetic.init_synthetic(
        dataset.x_train, dataset.y_train, ipc=int(d.ipc), num_classes=dataset.num_classes,
        factor=int(d.factor), init=d.init,
        seed=int(jax.random.randint(k, (), 0, 2**31 - 1)))
    return jnp.asarray(images), jnp.asarray(labels)


def dsa_augment_of(dsa: Optional[tuple], *, shared: bool):
    """DSA from ``(strategy, all_ops)``, or None for ``dsa=None``; ``shared`` gives the Siamese
    form (one transform per batch, :func:`dp_jax.data.augment.siamese`)."""
    if dsa is None:
        return None
    aug = make_augment("dsa", strategy=dsa[0], all_ops=bool(dsa[1]))
    return siamese(aug) if shared else aug


class RealData(NamedTuple):
    """The real training set on the device, with each class's example indices."""
    x: jax.Array       # (N, H, W, C)
    y: jax.Array       # (N,)
    table: jax.Array   # (num_classes, M) indices of each class's examples, padded with 0
    counts: jax.Array  # (num_classes,) examples per class


class MatchData(NamedTuple):
    """The arrays a matching program reads, passed to its jitted functions as an argument
    (constants would be baked into every compiled program)."""
    data: RealData
    labels: jax.Array   # stored labels, grouped by class
    mask: PyTree        # params-shaped boolean mask


def real_data(x_train: np.ndarray, y_train: np.ndarray, num_classes: int) -> RealData:
    """:class:`RealData` of a training split (ValueError if a class has no example)."""
    y = np.asarray(y_train)
    per = [np.flatnonzero(y == c) for c in range(num_classes)]
    if min(len(p) for p in per) == 0:
        raise ValueError("every class needs real training examples for gradient or "
                         "distribution matching")
    width = max(len(p) for p in per)
    table = np.zeros((num_classes, width), np.int32)
    for c, p in enumerate(per):
        table[c, :len(p)] = p
    return RealData(jnp.asarray(x_train, jnp.float32), jnp.asarray(y, jnp.int32),
                    jnp.asarray(table), jnp.asarray([len(p) for p in per], jnp.int32))


def class_batch(key: jax.Array, data: RealData, label, per_class: int) -> jax.Array:
    """``per_class`` distinct random real images of class ``label`` (may be traced).

    A uniformly random subset in random order (the ``per_class`` smallest of i.i.d. uniforms
    over the class's examples); ``per_class`` must not exceed the smallest class.
    """
    u = jax.random.uniform(key, data.table.shape[1:])
    u = jnp.where(jnp.arange(data.table.shape[1]) < data.counts[label], u, 2.0)
    _, pos = jax.lax.top_k(-u, per_class)
    return data.x[data.table[label][pos]]


def class_batches(key: jax.Array, data: RealData, per_class: int) -> jax.Array:
    """:func:`class_batch` of every class, class c from ``fold_in(key, c)``:
    (num_classes, per_class, H, W, C)."""
    return jnp.stack([class_batch(jax.random.fold_in(key, c), data, c, per_class)
                      for c in range(data.table.shape[0])])


def siamese_classes(augment, key: jax.Array, real: jax.Array,
                    syn: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Augment each class's real batch and synthetic images with one transform per class.

    Args:
      augment: a Siamese augmentation (:func:`dsa_augment` with ``shared=True``).
      key: class c uses ``fold_in(key, c)``.
      real: (num_classes, B, H, W, C); syn: (num_classes * m, H, W, C) grouped by class.
    """
    num_classes, b = real.shape[:2]
    both = jnp.concatenate([real, syn.reshape((num_classes, -1) + syn.shape[1:])], axis=1)
    keys = jnp.stack([jax.random.fold_in(key, c) for c in range(num_classes)])
    # One compiled augmentation for every class (lax.map), instead of one per class: DSA's
    # six-way op switch dominates compile time. The loop holds no convolution.
    out = jax.lax.map(lambda kx: augment(kx[0], kx[1]), (keys, both))
    return out[:, :b], out[:, b:].reshape(syn.shape)


def smallest_class(data: RealData) -> int:
    """Examples in the smallest class (host value, for static batch sizes)."""
    return int(np.min(np.asarray(data.counts)))


def dense_mask(model, image_shape) -> PyTree:
    """The all-True mask of ``model``'s parameters."""
    like = jax.eval_shape(lambda k: init_variables(model, k, image_shape)["params"],
                          jax.random.key(0))
    return jax.tree.map(lambda a: jnp.ones(a.shape, bool), like)


def fresh_network(model, key: jax.Array, image_shape, mask: PyTree) -> tuple[PyTree, PyTree]:
    """``(params * mask, batch_stats)`` of a newly initialised network (``{}`` without BN)."""
    v = init_variables(model, key, image_shape)
    return masks_lib.apply(v["params"], mask), v.get("batch_stats", {})


def forward(model, params: PyTree, bn: PyTree, x: jax.Array, *, train: bool,
            features: bool = False) -> tuple[jax.Array, PyTree]:
    """Logits (or penultimate features) and the BatchNorm statistics after the call.

    With BatchNorm, ``train=True`` normalises with the batch's statistics and returns updated
    running averages; ``train=False`` uses ``bn``. Models without BatchNorm return ``bn``.
    """
    fn = apply_features if features else (lambda m, v, xx, **kw: m.apply(v, xx, **kw))
    if bn and train:
        out, upd = fn(model, {"params": params, "batch_stats": bn}, x, train=True,
                      mutable=["batch_stats"])
        return out, upd["batch_stats"]
    variables = {"params": params, "batch_stats": bn} if bn else {"params": params}
    return fn(model, variables, x, train=train), bn


def ce_loss(model, params: PyTree, bn: PyTree, x: jax.Array, y: jax.Array, *,
            train: bool) -> tuple[jax.Array, PyTree]:
    """Mean cross-entropy of ``(x, y)`` and the BatchNorm statistics after the call."""
    logits, bn = forward(model, params, bn, x, train=train)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), bn


def train_step(model, tx: optax.GradientTransformation, params: PyTree, bn: PyTree, opt,
               x: jax.Array, y: jax.Array, mask: PyTree,
               augment: Optional[Callable] = None, key: Optional[jax.Array] = None):
    """One masked training step of a network on ``(x, y)`` (train mode, BN statistics kept).

    Returns ``(params, bn, opt)``; pruned weights get no update, so they stay zero.
    """
    if augment is not None:
        x = augment(key, x)
    (_, bn), g = jax.value_and_grad(
        lambda p: ce_loss(model, p, bn, x, y, train=True), has_aux=True)(params)
    g = masks_lib.apply(g, mask)
    u, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, u), bn, opt


def matching_method(config, dataset, *, name: str, program: Callable, settings_cls,
                    purpose: int, hint: str, mask: Optional[PyTree] = None) -> "DistillProgram":
    """The :class:`DistillProgram` of a matching distiller (gm, dm): initial images, real data, its
    compiled program (``program(model, settings)``, cached by the caller) and its key.

    The set's step size is ``distill.lr_init`` (these methods learn none).
    """
    d = config.distill
    model = create_model(config.model, num_classes=dataset.num_classes)
    images, labels = initial_images(config, dataset)
    data = real_data(dataset.x_train, dataset.y_train, dataset.num_classes)
    ctx = MatchData(data=data, labels=labels,
                  mask=dense_mask(model, dataset.image_shape) if mask is None else mask)
    prog = program(model, settings_cls.from_config(d, data=data, num_stored=labels.shape[0],
                                                   image_shape=dataset.image_shape))
    key = jax.random.fold_in(distill_key(config), purpose)
    lr = float(d.lr_init)
    return DistillProgram(
        name=name, state={"images": images, "opt": prog.tx_img.init(images)},
        step=functools.partial(prog.step, key=key, ctx=ctx), lr=lambda state: lr,
        labels=labels, factor=int(d.factor), examples=prog.examples(), hint=hint)

