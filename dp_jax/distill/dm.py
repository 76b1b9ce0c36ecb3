"""Distribution matching (DM, Zhao & Bilen 2023).

One iteration: a freshly initialised network whose weights are not trained; for every class c a
real batch of ``dm_batch_real`` images of c and the synthetic images of c get the same DSA
transform (Siamese, one key per class); the loss is

    sum_c || mean_i embed(real_c,i) - mean_j embed(syn_c,j) ||^2

with ``embed`` the features entering the network's classifier
(:func:`dp_jax.models.apply_features`), and one SGD step (``dm_lr_img``, momentum
``dm_momentum_img``) on the stored images follows (gradients pass through multi-formation
decoding). The real embeddings are constants.

The network runs in train mode on the real batches of all classes at once and on the synthetic
images of all classes at once, which is DM's BatchNorm branch (statistics over every class); for
models without BatchNorm the embeddings are per example, so this equals the per-class loop of
DM's ConvNet branch.

Keys: iteration ``it`` uses ``k = fold(distill_key, DISTILL_DM, it)``; the network initialises
from ``fold(k, MATCH_NET_INIT)``; ``ko = fold(k, MATCH_OUTER, 0)`` gives class c's real batch
``fold(ko, MATCH_REAL, c)`` and its Siamese transform ``fold(ko, MATCH_AUG, c)``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dp_jax import rng
from dp_jax.distill import common, synthetic
from dp_jax.models import contract, create_model
from dp_jax.models.convs import fast_convs

PyTree = Any


def embed(model, params: PyTree, bn: PyTree, x: jax.Array) -> jax.Array:
    """Penultimate features of ``x`` (train mode; BatchNorm uses the batch's statistics)."""
    return common.forward(model, params, bn, x, train=True, features=True)[0]


def dm_loss(model, params: PyTree, bn: PyTree, real: jax.Array, syn: jax.Array, *,
            augment: Optional[Callable] = None, key: Optional[jax.Array] = None) -> jax.Array:
    """Sum over classes of the squared distance between mean real and mean synthetic embeddings.

    Args:
      real: (num_classes, B, H, W, C) real batches, one per class.
      syn: (num_classes * m, H, W, C) synthetic images grouped by class (m per class).
      augment: Siamese augmentation ``augment(key, x)``; class c uses ``fold_in(key, c)`` for
        both its real batch and its synthetic images (:func:`common.siamese_classes`).
    """
    num_classes, b = real.shape[:2]
    m = syn.shape[0] // num_classes
    if augment is not None:
        real, syn = common.siamese_classes(augment, key, real, syn)
    er = embed(model, params, bn, real.reshape((-1,) + real.shape[2:]))
    es = embed(model, params, bn, syn)
    mean_r = jax.lax.stop_gradient(er.reshape(num_classes, b, -1).mean(axis=1))
    mean_s = es.reshape(num_classes, m, -1).mean(axis=1)
    return jnp.sum((mean_r - mean_s) ** 2)


@dataclasses.dataclass(frozen=True)
class Settings:
    """The static settings of a distribution-matching program (hashable: programs are cached)."""
    batch_real: int
    lr_img: float
    momentum_img: float
    dsa: Optional[tuple]      # (strategy, all_ops) or None
    fast_conv: bool
    num_classes: int
    n_syn: int                # decoded synthetic images
    factor: int
    image_shape: tuple

    @classmethod
    def from_config(cls, d, *, data: common.RealData, num_stored: int, image_shape):
        """Settings of ``config.distill``; the real batch is clipped to the smallest class."""
        return cls(batch_real=min(int(d.dm_batch_real), common.smallest_class(data)),
                   lr_img=float(d.dm_lr_img), momentum_img=float(d.dm_momentum_img),
                   dsa=(d.dsa_strategy, bool(d.dsa_all_ops)) if d.dsa else None,
                   fast_conv=bool(d.fast_conv), num_classes=int(data.table.shape[0]),
                   n_syn=int(num_stored) * int(d.factor) ** 2, factor=int(d.factor),
                   image_shape=tuple(image_shape))


class DistributionMatching:
    """The jitted DM iteration for one static configuration.

    Args:
      model: the Flax network (never trained).
      s: :class:`Settings`.
      wrap: applied to the update before ``jax.jit`` (tests count traces with it).
    """

    def __init__(self, model, s: Settings, *, wrap: Callable = lambda f: f):
        self.model, self.s = model, s
        self.tx_img = common.sgd(s.lr_img, s.momentum_img)
        self.siamese = common.dsa_augment_of(s.dsa, shared=True)
        self._update = jax.jit(wrap(self._update_fn))

    def examples(self) -> int:
        """Real plus synthetic images embedded in one iteration."""
        return self.s.num_classes * self.s.batch_real + self.s.n_syn

    def loss_of_images(self, images, params, bn, k_outer, ctx) -> jax.Array:
        """The DM loss as a function of the stored images (pure)."""
        syn = synthetic.decode(images, ctx.labels, self.s.factor)[0]
        real = common.class_batches(jax.random.fold_in(k_outer, rng.MATCH_REAL), ctx.data,
                                    self.s.batch_real)
        return dm_loss(self.model, params, bn, real, syn, augment=self.siamese,
                       key=jax.random.fold_in(k_outer, rng.MATCH_AUG))

    def _update_fn(self, images, opt, key, it, ctx):
        k_it = jax.random.fold_in(key, it)
        params, bn = common.fresh_network(
            self.model, jax.random.fold_in(k_it, rng.MATCH_NET_INIT), self.s.image_shape,
            ctx.mask)
        k_outer = rng.fold(k_it, rng.MATCH_OUTER, 0)
        loss, g = jax.value_and_grad(self.loss_of_images)(images, params, bn, k_outer, ctx)
        u, opt = self.tx_img.update(g, opt, images)
        return (optax.apply_updates(images, u), opt, loss / self.s.num_classes,
                optax.tree.norm(g))

    def step(self, state: dict, it: int, *, key: jax.Array, ctx: common.MatchData):
        """One iteration: ``(state, loss per class, info)``; ``key`` is
        ``fold(distill_key, DISTILL_DM)``."""
        with fast_convs(self.s.fast_conv):
            # The iteration number travels explicitly: no implicit copy inside the loop.
            images, opt, loss, gnorm = self._update(state["images"], state["opt"], key,
                                                    jax.device_put(np.int32(it)), ctx)
        return {"images": images, "opt": opt}, loss, {"grad_norm_images": gnorm}


@functools.lru_cache(maxsize=8)
def _program(model, settings: Settings) -> DistributionMatching:
    # Cached so that repeated distillations in one process reuse the compiled update.
    return DistributionMatching(model, settings)


def build_method(config, dataset, *, mask: Optional[PyTree] = None) -> common.DistillProgram:
    """The :class:`dp_jax.distill.common.DistillProgram` of ``config.distill`` (method ``dm``)."""
    d = config.distill
    # DM matches the embeddings that enter the classifier: the model must expose them.
    contract.check(create_model(config.model, num_classes=dataset.num_classes),
                   dataset.image_shape, dataset.num_classes, needs_head=True,
                   needs_features=True)
    return common.matching_method(config, dataset, name="dm", program=_program,
                                  settings_cls=Settings, purpose=rng.DISTILL_DM, mask=mask,
                                  hint=f"distill.dm_lr_img ({d.dm_lr_img})")


def describe(d) -> str:
    """One line for report.md."""
    return (f"Distribution matching (DM): {d.iterations} iterations, real batch "
            f"{d.dm_batch_real}/class, lr_img {d.dm_lr_img} (momentum {d.dm_momentum_img}), "
            f"Siamese DSA {'`' + d.dsa_strategy + '`' if d.dsa else 'off'}; the set is "
            f"evaluated with lr_init {d.lr_init}; no experts.")
