"""CutMix (Yun et al., 2019) for small-set training, as IDC trains on its condensed sets.

With probability ``prob`` a batch is mixed: ``lam ~ Beta(beta, beta)``, a box of side
``int(side * sqrt(1 - lam))`` centred at a uniform pixel (clipped to the image) is pasted from a
permutation of the batch, and the labels are mixed by the pasted area, ``ratio = 1 - area/HW``.
The mixed labels are returned as soft targets ``ratio * onehot(y) + (1 - ratio) *
onehot(y[perm])``: their cross-entropy equals ``ratio * CE(y) + (1 - ratio) * CE(y[perm])``,
the reference's two-term loss. Unmixed batches get one-hot targets. Everything is jittable
(the box is a comparison mask, not a dynamic slice), so the whole inner loop stays one program.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def box(key: jax.Array, height: int, width: int, lam: jax.Array) -> tuple:
    """``(r1, r2, c1, c2)``: the clipped box for mixing ratio ``lam`` (half-open bounds)."""
    k_r, k_c = jax.random.split(key)
    cut = jnp.sqrt(1.0 - lam)
    cut_h = jnp.floor(height * cut).astype(jnp.int32)
    cut_w = jnp.floor(width * cut).astype(jnp.int32)
    cr = jax.random.randint(k_r, (), 0, height)
    cc = jax.random.randint(k_c, (), 0, width)
    r1, r2 = jnp.clip(cr - cut_h // 2, 0, height), jnp.clip(cr + cut_h // 2, 0, height)
    c1, c2 = jnp.clip(cc - cut_w // 2, 0, width), jnp.clip(cc + cut_w // 2, 0, width)
    return r1, r2, c1, c2


def cutmix(key: jax.Array, x: jax.Array, y: jax.Array, num_classes: int, *, prob: float,
           beta: float) -> tuple[jax.Array, jax.Array]:
    """Mixed NHWC images and ``(N, num_classes)`` soft targets for the integer labels ``y``."""
    k_apply, k_lam, k_perm, k_box = jax.random.split(key, 4)
    n, h, w = x.shape[0], x.shape[1], x.shape[2]
    lam = jax.random.beta(k_lam, beta, beta)
    perm = jax.random.permutation(k_perm, n)
    r1, r2, c1, c2 = box(k_box, h, w, lam)
    rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
    inside = (rows >= r1) & (rows < r2) & (cols >= c1) & (cols < c2)
    mix = jax.random.uniform(k_apply) < prob
    inside = inside & mix
    x_mixed = jnp.where(inside[None, :, :, None], x[perm], x)
    ratio = 1.0 - jnp.sum(inside) / (h * w)
    onehot = jax.nn.one_hot(y, num_classes, dtype=jnp.float32)
    return x_mixed, ratio * onehot + (1.0 - ratio) * onehot[perm]
