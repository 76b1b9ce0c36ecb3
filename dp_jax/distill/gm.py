"""Gradient matching: Dataset Condensation (DC) with Siamese augmentation (DSA) and IDC's options.

One iteration (DC's "Iteration"): a freshly initialised network, then ``gm_outer_loops`` times

  1. for every class c: a real batch of ``gm_batch_real`` images of c and the synthetic images of
     c get the same DSA transform (Siamese, one key per class and outer loop); the class loss is
     a layer-wise distance between ``grad CE(real batch)`` and ``grad CE(synthetic images)`` with
     respect to the network's weights; the real gradient is a constant;
  2. one SGD step (``gm_lr_img``, momentum ``gm_momentum_img``) on the stored images for the sum
     of the class losses (gradients pass through multi-formation decoding);
  3. except after the last outer loop, ``gm_inner_loops`` SGD steps (lr ``lr_init``) of the
     network on minibatches of ``gm_batch_net`` synthetic images (DC) or real images (IDC,
     ``gm_net_train='real'``), DSA per example.

Distances (``gm_distance``), summed over the weights with two or more dimensions (conv and dense
kernels; biases and norm parameters are ignored, as DC's distance does; IDC's default ignores
them too):

  ``dsa``  DC's: a kernel of shape (..., out) is read as columns (-1, out), one per output node;
           the layer's distance is ``sum_j 1 - <r_j, s_j> / (|r_j| |s_j| + 1e-6)``.
  ``mse``  ``sum (r - s)**2`` (IDC's ``mse``).
  ``l1``   ``sum |r - s|`` (IDC's ``l1``).

BatchNorm models follow DC: before each match the running statistics are updated with one
train-mode pass over 16 real images per class, and matching runs in eval mode with them; the
network's own training updates them as usual.

Keys: iteration ``it`` uses ``k = fold(distill_key, DISTILL_GM, it)``; the network initialises
from ``fold(k, MATCH_NET_INIT)``; outer loop ``ol`` uses ``ko = fold(k, MATCH_OUTER, ol)`` with
``fold(ko, MATCH_REAL, c)`` for class c's real batch, ``fold(ko, MATCH_AUG, c)`` for its Siamese
transform, ``fold(ko, MATCH_BN)`` for the BatchNorm batch, and network step t takes minibatch
``small_set.batch_at(kn, t, ...)`` with ``kn = fold(ko, MATCH_NET_TRAIN)`` (epochs without
replacement over the synthetic or real pool) and augmentation key ``fold(kn, 1, t)``.

Each class's loss and image gradient is one jitted call (the class index is traced), so the
program compiles once rather than once per class; the calls are dispatched without reading
anything back.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dp_jax import masks as masks_lib
from dp_jax import rng
from dp_jax.training import small_set
from dp_jax.distill import common, synthetic
from dp_jax.models import init_variables
from dp_jax.models.convs import fast_convs

PyTree = Any
DISTANCES = ("dsa", "mse", "l1")
NET_TRAIN = ("syn", "real")
BN_PER_CLASS = 16   # DC's real images per class for the BatchNorm statistics
COS_EPS = 1e-6      # DC's guard in the cosine denominator


def matched_leaves(grads: PyTree) -> list[jax.Array]:
    """The leaves a distance compares: every weight with two or more dimensions."""
    return [g for g in jax.tree.leaves(grads) if g.ndim >= 2]


def _columns(g: jax.Array) -> jax.Array:
    # Flax kernels keep the output axis last (dense (in, out), conv HWIO): column j holds every
    # weight into output node j, PyTorch's row j of (out, in*h*w).
    return g.reshape(-1, g.shape[-1])


def _column_norms(a: jax.Array) -> jax.Array:
    # Euclidean norms whose derivative at a zero column is 0 (PyTorch's convention), not NaN:
    # a dead unit or a pruned output node has an all-zero gradient column.
    sq = jnp.sum(a * a, axis=0)
    pos = sq > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def dsa_distance(g_real: PyTree, g_syn: PyTree) -> jax.Array:
    """DC's distance: per layer, the sum over output nodes of 1 - cosine similarity."""
    total = jnp.float32(0.0)
    for r, s in zip(matched_leaves(g_real), matched_leaves(g_syn)):
        r, s = _columns(r), _columns(s)
        cos = jnp.sum(r * s, axis=0) / (_column_norms(r) * _column_norms(s) + COS_EPS)
        total = total + jnp.sum(1.0 - cos)
    return total


def mse_distance(g_real: PyTree, g_syn: PyTree) -> jax.Array:
    """Sum of squared differences of the matched gradients."""
    return sum(jnp.sum((r - s) ** 2)
               for r, s in zip(matched_leaves(g_real), matched_leaves(g_syn)))


def l1_distance(g_real: PyTree, g_syn: PyTree) -> jax.Array:
    """Sum of absolute differences of the matched gradients."""
    return sum(jnp.sum(jnp.abs(r - s))
               for r, s in zip(matched_leaves(g_real), matched_leaves(g_syn)))


DISTANCE_FNS = {"dsa": dsa_distance, "mse": mse_distance, "l1": l1_distance}


def ce_gradients(model, params: PyTree, bn: PyTree, x: jax.Array, label, mask: PyTree):
    """Masked gradient of the mean cross-entropy of ``x`` (all of class ``label``).

    Eval mode with BatchNorm statistics ``bn`` when the model has BatchNorm (DC freezes them for
    matching); models without BatchNorm have no train/eval difference.
    """
    y = jnp.full((x.shape[0],), label, jnp.int32)
    g = jax.grad(lambda p: common.ce_loss(model, p, bn, x, y, train=not bn)[0])(params)
    return masks_lib.apply(g, mask)


def class_loss(model, params: PyTree, bn: PyTree, real: jax.Array, syn: jax.Array, label, *,
               distance: str, mask: PyTree, augment: Optional[Callable] = None,
               key: Optional[jax.Array] = None) -> jax.Array:
    """Gradient distance between a real batch and the synthetic images of class ``label``.

    ``augment(key, x)`` (Siamese) transforms both batches as one, so they share the transform;
    the real gradient is a constant.
    """
    if augment is not None:
        both = augment(key, jnp.concatenate([real, syn]))
        real, syn = both[:real.shape[0]], both[real.shape[0]:]
    g_real = jax.lax.stop_gradient(ce_gradients(model, params, bn, real, label, mask))
    return DISTANCE_FNS[distance](g_real, ce_gradients(model, params, bn, syn, label, mask))


def match_loss(model, params: PyTree, bn: PyTree, real: jax.Array, syn: jax.Array, *,
               distance: str, mask: PyTree, augment: Optional[Callable] = None,
               key: Optional[jax.Array] = None) -> jax.Array:
    """Sum over classes of :func:`class_loss` (class c's transform from ``fold_in(key, c)``).

    Args:
      real: (num_classes, B, H, W, C) real batches, one per class.
      syn: (num_classes * m, H, W, C) synthetic images grouped by class (m per class).
    """
    num_classes = real.shape[0]
    m = syn.shape[0] // num_classes
    return sum(class_loss(model, params, bn, real[c], syn[c * m:(c + 1) * m], c,
                          distance=distance, mask=mask, augment=augment,
                          key=None if augment is None else jax.random.fold_in(key, c))
               for c in range(num_classes))


@dataclasses.dataclass(frozen=True)
class Settings:
    """The static settings of a gradient-matching program (hashable: programs are cached)."""
    distance: str
    outer: int
    inner: int
    net_train: str
    batch_real: int
    batch_bn: int
    batch_net: int
    lr_img: float
    momentum_img: float
    lr_net: float
    dsa: Optional[tuple]      # (strategy, all_ops) or None
    fast_conv: bool
    num_classes: int
    n_syn: int                # decoded synthetic images
    factor: int
    image_shape: tuple

    @classmethod
    def from_config(cls, d, *, data: common.RealData, num_stored: int, image_shape):
        """Settings of ``config.distill``; batches are clipped to what the data holds."""
        smallest = common.smallest_class(data)
        n_syn = int(num_stored) * int(d.factor) ** 2
        pool = n_syn if d.gm_net_train == "syn" else int(data.y.shape[0])
        return cls(distance=d.gm_distance, outer=int(d.gm_outer_loops),
                   inner=int(d.gm_inner_loops), net_train=d.gm_net_train,
                   # Static shapes: a class smaller than the batch lends all its images.
                   batch_real=min(int(d.gm_batch_real), smallest),
                   batch_bn=min(BN_PER_CLASS, smallest), batch_net=min(int(d.gm_batch_net), pool),
                   lr_img=float(d.gm_lr_img), momentum_img=float(d.gm_momentum_img),
                   lr_net=float(d.lr_init),
                   dsa=(d.dsa_strategy, bool(d.dsa_all_ops)) if d.dsa else None,
                   fast_conv=bool(d.fast_conv), num_classes=int(data.table.shape[0]),
                   n_syn=n_syn, factor=int(d.factor), image_shape=tuple(image_shape))


class GradientMatching:
    """The jitted pieces of a gradient-matching iteration for one static configuration.

    Arrays (real data, labels, mask) reach the jitted functions as a
    :class:`dp_jax.distill.common.MatchData` argument, never as constants, so one program serves
    every run with the same settings.

    Args:
      model: the Flax network.
      s: :class:`Settings`.
      wrap: applied to every function before ``jax.jit`` (tests count traces with it).
    """

    def __init__(self, model, s: Settings, *, wrap: Callable = lambda f: f):
        self.model, self.s = model, s
        self.tx_img = common.sgd(s.lr_img, s.momentum_img)
        self.tx_net = common.sgd(s.lr_net, 0.0)
        self.siamese = common.dsa_augment_of(s.dsa, shared=True)
        self.augment = common.dsa_augment_of(s.dsa, shared=False)
        like = jax.eval_shape(lambda k: init_variables(model, k, s.image_shape),
                              jax.random.key(0))
        self.has_bn = bool(jax.tree.leaves(like.get("batch_stats", {})))
        self._init = jax.jit(wrap(self._init_fn))
        self._zeros = jax.jit(wrap(jnp.zeros_like))
        self._mean = jax.jit(wrap(lambda total: total / (s.num_classes * s.outer)))  # DC's
        # Loop indices (class, outer loop, network step) copied to the device once,
        # explicitly: the jitted pieces take them as arguments (one program for all).
        self._ints = [jax.device_put(np.int32(i))
                      for i in range(max(s.num_classes, s.outer, s.inner, 1))]
        self._class = jax.jit(wrap(self._class_fn))
        self._apply = jax.jit(wrap(self._apply_fn))
        self._net = jax.jit(wrap(self._net_fn))
        self._bn = jax.jit(wrap(self._bn_fn))

    def examples(self) -> int:
        """Real plus synthetic images the networks process in one iteration."""
        s = self.s
        bn = s.num_classes * s.batch_bn * s.outer if self.has_bn else 0
        return (s.outer * (s.num_classes * s.batch_real + s.n_syn)
                + (s.outer - 1) * s.inner * s.batch_net + bn)

    @staticmethod
    def _outer_key(k_it, ol):
        return rng.fold(jax.random.fold_in(k_it, rng.MATCH_OUTER), ol)

    def _init_fn(self, key, it, ctx):
        """Iteration ``it``'s key, fresh network, its optimiser state and a zero loss sum."""
        k_it = jax.random.fold_in(key, it)
        params, bn = common.fresh_network(
            self.model, jax.random.fold_in(k_it, rng.MATCH_NET_INIT), self.s.image_shape,
            ctx.mask)
        return k_it, params, bn, self.tx_net.init(params), jnp.float32(0.0)

    def class_loss_of_images(self, images, params, bn, k_outer, c, ctx) -> jax.Array:
        """Class ``c``'s loss as a function of the stored images (pure; ``c`` may be traced)."""
        s = self.s
        syn = synthetic.decode(images, ctx.labels, s.factor)[0]
        m = s.n_syn // s.num_classes
        real = common.class_batch(rng.fold(k_outer, rng.MATCH_REAL, c), ctx.data, c,
                                  s.batch_real)
        return class_loss(self.model, params, bn, real,
                          jax.lax.dynamic_slice_in_dim(syn, c * m, m), c,
                          distance=s.distance, mask=ctx.mask, augment=self.siamese,
                          key=rng.fold(k_outer, rng.MATCH_AUG, c))

    def _class_fn(self, images, grad, loss, params, bn, k_it, ol, c, ctx):
        # One class per call: the program compiles once, not once per class.
        l, g = jax.value_and_grad(self.class_loss_of_images)(
            images, params, bn, self._outer_key(k_it, ol), c, ctx)
        return grad + g, loss + l

    def _apply_fn(self, images, opt, grad):
        u, opt = self.tx_img.update(grad, opt, images)
        return optax.apply_updates(images, u), opt, optax.tree.norm(grad)

    def _bn_fn(self, params, bn, k_it, ol, ctx):
        k = jax.random.fold_in(self._outer_key(k_it, ol), rng.MATCH_BN)
        x = common.class_batches(k, ctx.data, self.s.batch_bn)
        return common.forward(self.model, params, bn, x.reshape((-1,) + x.shape[2:]),
                              train=True)[1]

    def _net_fn(self, params, bn, opt, images, k_it, ol, t, ctx):
        s = self.s
        k = rng.fold(self._outer_key(k_it, ol), rng.MATCH_NET_TRAIN)
        if s.net_train == "syn":
            x, y = synthetic.decode(jax.lax.stop_gradient(images), ctx.labels, s.factor)
        else:  # IDC: the network keeps learning from real data
            x, y = ctx.data.x, ctx.data.y
        # Epochs without replacement over the pool, as DC's and IDC's data loaders.
        idx = small_set.batch_at(k, t, x.shape[0], s.batch_net)
        return common.train_step(self.model, self.tx_net, params, bn, opt, x[idx], y[idx],
                                 ctx.mask, self.augment, rng.fold(k, 1, t))

    def _match(self, images, opt, params, bn, k_it, ol, total, ctx):
        """Every class's loss and image gradient, then one image step for their sum (DC)."""
        grad, n = self._zeros(images), self._ints
        for c in range(self.s.num_classes):
            grad, total = self._class(images, grad, total, params, bn, k_it, ol, n[c], ctx)
        images, opt, gnorm = self._apply(images, opt, grad)
        return images, opt, gnorm, total

    def step(self, state: dict, it: int, *, key: jax.Array, ctx: common.MatchData):
        """One iteration: ``(state, mean class loss, info)`` (see module docstring).

        ``key`` is ``fold(distill_key, DISTILL_GM)``.
        """
        s, n = self.s, self._ints
        images, opt = state["images"], state["opt"]
        with fast_convs(s.fast_conv):
            k_it, params, bn, opt_net, total = self._init(key, jax.device_put(np.int32(it)),
                                                          ctx)
            for ol in range(s.outer):
                if bn:
                    bn = self._bn(params, bn, k_it, n[ol], ctx)
                images, opt, gnorm, total = self._match(images, opt, params, bn, k_it, n[ol],
                                                        total, ctx)
                for t in range(s.inner if ol + 1 < s.outer else 0):
                    params, bn, opt_net = self._net(params, bn, opt_net, images, k_it, n[ol],
                                                    n[t], ctx)
        return {"images": images, "opt": opt}, self._mean(total), {"grad_norm_images": gnorm}


@functools.lru_cache(maxsize=8)
def _program(model, settings: Settings) -> GradientMatching:
    # Cached so that repeated distillations in one process (resumes, tests, pruning runs)
    # reuse the compiled programs.
    return GradientMatching(model, settings)


def build_method(config, dataset, *, mask: Optional[PyTree] = None) -> common.DistillProgram:
    """The :class:`dp_jax.distill.common.DistillProgram` of ``config.distill`` (method ``gm``)."""
    d = config.distill
    return common.matching_method(config, dataset, name="gm", program=_program,
                                  settings_cls=Settings, purpose=rng.DISTILL_GM, mask=mask,
                                  hint=f"distill.gm_lr_img ({d.gm_lr_img}) or distill.lr_init ({d.lr_init})")


def describe(d) -> str:
    """One line for report.md."""
    return (f"Gradient matching (DC/DSA): {d.iterations} iterations x {d.gm_outer_loops} outer "
            f"loops, distance `{d.gm_distance}`, real batch {d.gm_batch_real}/class, network "
            f"trained on `{d.gm_net_train}` data for {d.gm_inner_loops} steps (lr {d.lr_init}, "
            f"batch {d.gm_batch_net}) between matches, lr_img {d.gm_lr_img} (momentum "
            f"{d.gm_momentum_img}), Siamese DSA {'`' + d.dsa_strategy + '`' if d.dsa else 'off'}; "
            "no experts.")
