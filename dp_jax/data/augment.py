"""Differentiable Siamese Augmentation (DSA) and simple real-data augmentation, in JAX.

Every transform is a pure function ``f(key, x) -> x`` on a batch of NHWC float images in model
input space. The same key always gives the same transform, and every transform is differentiable
with respect to the images (the random parameters are drawn from the key and are constants): the
geometric ops resample with fixed bilinear or integer weights, the colour ops are affine in the
pixels, cutout multiplies by a fixed 0/1 mask.

Operations and magnitudes follow the DSA parameters MTT uses (``ParamDiffAug``), each drawn
independently per example:

  ======== =========================================================================
  op       transform (magnitude at ``strength=1``)
  ======== =========================================================================
  color    brightness ``x + (u - 1/2) * 1.0``; saturation: channel-mean blend with factor
           ``2u`` in [0, 2]; contrast: image-mean blend with factor ``u + 1/2`` in [0.5, 1.5]
  crop     integer translation by up to ``round(0.125 * side)`` pixels, zero fill
  cutout   zero a square of side ``round(0.5 * side)`` at a random centre
  flip     horizontal flip with probability 0.5
  scale    independent x/y zoom by a factor in [1/1.2, 1.2] (bilinear, zero fill)
  rotate   rotation by up to +-15 degrees (bilinear, zero fill)
  ======== =========================================================================

MTT applies *one* op per call, chosen at random from ``'color_crop_cutout_flip_scale_rotate'``
(``all_ops=False``, the default here); ``all_ops=True`` applies every op of the strategy in order
(DSA's multi-op mode). ``strength`` scales every magnitude; ``strength=0`` is the identity.
Resampling uses ``align_corners=True`` conventions, as ``torch.nn.functional.grid_sample`` in
the reference, so geometric ops with identity parameters return the input.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp

AUGMENTATIONS = ("none", "dsa", "flip_translate")
# Earlier name of "flip_translate" (accepted so that configs and workdirs that use it still
# work). The data section's "crop_flip" is another transform: zero-pad crop + flip
# (dp_jax.data.crops), applied to real-data training.
ALIASES = {"flip_crop": "flip_translate"}
DSA_OPS = ("color", "crop", "cutout", "flip", "scale", "rotate")
DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"

Augment = Callable[[jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class DSAParams:
    """Magnitudes of the DSA ops (MTT's ``ParamDiffAug`` defaults)."""
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5
    crop: float = 0.125     # max translation as a fraction of the side
    cutout: float = 0.5     # cutout side as a fraction of the image side
    flip: float = 0.5       # flip probability
    scale: float = 1.2      # max zoom ratio
    rotate: float = 15.0    # max rotation in degrees

    def scaled(self, strength: float) -> "DSAParams":
        """Magnitudes multiplied by ``strength`` (ratios interpolated geometrically; 0 = identity)."""
        s = float(strength)
        return DSAParams(brightness=self.brightness * s,
                         saturation=self.saturation * s,
                         contrast=self.contrast * s,
                         crop=self.crop * s, cutout=self.cutout * s, flip=self.flip * s,
                         scale=self.scale ** s, rotate=self.rotate * s)


def _uniform(key, n):
    return jax.random.uniform(key, (n, 1, 1, 1), jnp.float32)


# --------------------------------------------------------------------------------------------
# Colour ops: affine in the pixels.

def color(key: jax.Array, x: jax.Array, p: DSAParams) -> jax.Array:
    """Brightness, saturation and contrast jitter (in that order), per example."""
    kb, ks, kc = jax.random.split(key, 3)
    n = x.shape[0]
    x = x + (_uniform(kb, n) - 0.5) * p.brightness
    # Saturation factor 2u lies in [0, 2] at full strength: 1 + s*(2u - 1) keeps its range and
    # collapses to 1 at strength 0 (p.saturation = 2 * strength).
    sat = 1.0 + (p.saturation / 2.0) * (2.0 * _uniform(ks, n) - 1.0)
    mean_c = jnp.mean(x, axis=-1, keepdims=True)
    x = (x - mean_c) * sat + mean_c
    con = 1.0 + 2.0 * p.contrast * (_uniform(kc, n) - 0.5)
    mean_all = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
    return (x - mean_all) * con + mean_all


# --------------------------------------------------------------------------------------------
# Geometric ops: resampling with weights that depend only on the key.

def _gather(x: jax.Array, rows: jax.Array, cols: jax.Array) -> jax.Array:
    """``x[b, rows[b,i,j], cols[b,i,j], :]`` with zeros where (rows, cols) is out of range."""
    b, h, w, c = x.shape
    valid = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    flat_idx = jnp.clip(rows, 0, h - 1) * w + jnp.clip(cols, 0, w - 1)
    picked = jnp.take_along_axis(x.reshape(b, h * w, c), flat_idx.reshape(b, h * w, 1), axis=1)
    return picked.reshape(b, h, w, c) * valid[..., None].astype(x.dtype)


def _bilinear(x: jax.Array, rows: jax.Array, cols: jax.Array) -> jax.Array:
    """Bilinear sampling at fractional pixel coordinates, zero padding outside the image."""
    r0, c0 = jnp.floor(rows), jnp.floor(cols)
    fr, fc = (rows - r0)[..., None], (cols - c0)[..., None]
    r0, c0 = r0.astype(jnp.int32), c0.astype(jnp.int32)
    return ((1 - fr) * (1 - fc) * _gather(x, r0, c0) + (1 - fr) * fc * _gather(x, r0, c0 + 1)
            + fr * (1 - fc) * _gather(x, r0 + 1, c0) + fr * fc * _gather(x, r0 + 1, c0 + 1))


def _affine(x: jax.Array, theta: jax.Array) -> jax.Array:
    """``grid_sample(x, affine_grid(theta), align_corners=True)`` for per-example 2x3 ``theta``.

    ``theta`` maps normalised output coordinates (x right, y down, in [-1, 1]) to input ones.
    """
    _, h, w, _ = x.shape
    ys = jnp.linspace(-1.0, 1.0, h)
    xs = jnp.linspace(-1.0, 1.0, w)
    gy, gx = jnp.meshgrid(ys, xs, indexing="ij")
    src_x = (theta[:, 0, 0, None, None] * gx + theta[:, 0, 1, None, None] * gy
             + theta[:, 0, 2, None, None])
    src_y = (theta[:, 1, 0, None, None] * gx + theta[:, 1, 1, None, None] * gy
             + theta[:, 1, 2, None, None])
    cols = (src_x + 1.0) * 0.5 * (w - 1)
    rows = (src_y + 1.0) * 0.5 * (h - 1)
    return _bilinear(x, rows, cols)


def scale(key: jax.Array, x: jax.Array, p: DSAParams) -> jax.Array:
    """Independent x/y zoom by factors in [1/ratio, ratio] (ratio 1 = identity)."""
    n = x.shape[0]
    kx, ky = jax.random.split(key)
    lo, hi = 1.0 / p.scale, p.scale
    sx = jax.random.uniform(kx, (n,)) * (hi - lo) + lo
    sy = jax.random.uniform(ky, (n,)) * (hi - lo) + lo
    z = jnp.zeros((n,))
    theta = jnp.stack([jnp.stack([sx, z, z], -1), jnp.stack([z, sy, z], -1)], 1)
    return _affine(x, theta)


def rotate(key: jax.Array, x: jax.Array, p: DSAParams) -> jax.Array:
    """Rotation by an angle uniform in +-``p.rotate`` degrees."""
    n = x.shape[0]
    ang = (jax.random.uniform(key, (n,)) - 0.5) * 2.0 * p.rotate / 180.0 * math.pi
    cos, sin, z = jnp.cos(ang), jnp.sin(ang), jnp.zeros((n,))
    theta = jnp.stack([jnp.stack([cos, sin, z], -1), jnp.stack([-sin, cos, z], -1)], 1)
    return _affine(x, theta)


def flip(key: jax.Array, x: jax.Array, p: DSAParams) -> jax.Array:
    """Horizontal flip of each example with probability ``p.flip``."""
    do = jax.random.uniform(key, (x.shape[0], 1, 1, 1)) < p.flip
    return jnp.where(do, x[:, :, ::-1, :], x)


def crop(key: jax.Array, x: jax.Array, p: DSAParams) -> jax.Array:
    """Integer translation by up to ``round(p.crop * side)`` pixels per axis, zero fill."""
    n, h, w, _ = x.shape
    max_r, max_c = int(h * p.crop + 0.5), int(w * p.crop + 0.5)
    if max_r == 0 and max_c == 0:
        return x
    kr, kc = jax.random.split(key)
    tr = jax.random.randint(kr, (n, 1, 1), -max_r, max_r + 1)
    tc = jax.random.randint(kc, (n, 1, 1), -max_c, max_c + 1)
    rows = jnp.arange(h)[None, :, None] + tr
    cols = jnp.arange(w)[None, None, :] + tc
    return _gather(x, jnp.broadcast_to(rows, (n, h, w)), jnp.broadcast_to(cols, (n, h, w)))


def cutout(key: jax.Array, x: jax.Array, p: DSAParams) -> jax.Array:
    """Zero a square of side ``round(p.cutout * side)`` centred at a random pixel (clipped)."""
    n, h, w, _ = x.shape
    sr, sc = int(h * p.cutout + 0.5), int(w * p.cutout + 0.5)
    if sr == 0 or sc == 0:
        return x
    kr, kc = jax.random.split(key)
    # Same centre range as the reference: [0, side + (1 - size % 2)).
    cr = jax.random.randint(kr, (n, 1, 1), 0, h + (1 - sr % 2))
    cc = jax.random.randint(kc, (n, 1, 1), 0, w + (1 - sc % 2))
    r = jnp.arange(h)[None, :, None]
    c = jnp.arange(w)[None, None, :]
    top, left = cr - sr // 2, cc - sc // 2
    inside = (r >= top) & (r < top + sr) & (c >= left) & (c < left + sc)
    return x * (~inside)[..., None].astype(x.dtype)


OP_FNS = {"color": color, "crop": crop, "cutout": cutout, "flip": flip, "scale": scale,
          "rotate": rotate}


def parse_strategy(strategy: str) -> tuple[str, ...]:
    """``'color_crop_...'`` -> op names; ValueError naming unknown ops."""
    ops = tuple(o for o in str(strategy).split("_") if o)
    bad = [o for o in ops if o not in OP_FNS]
    if not ops or bad:
        raise ValueError(f"DSA strategy {strategy!r}: unknown op(s) {bad}; allowed ops: "
                         f"{', '.join(DSA_OPS)} joined by '_'")
    return ops


def dsa(key: jax.Array, x: jax.Array, *, strategy: str = DEFAULT_STRATEGY,
        params: DSAParams = DSAParams(), strength: float = 1.0,
        all_ops: bool = False) -> jax.Array:
    """Apply DSA to the batch ``x`` (B, H, W, C).

    Args:
      key: the transform's key (same key -> same transform).
      x: images in model input space.
      strategy: ops joined by ``_`` (see module docstring).
      params: magnitudes at strength 1.
      strength: multiplies every magnitude; 0 gives the identity.
      all_ops: apply every op in order instead of one op chosen at random.

    Returns:
      The augmented batch, same shape and dtype.
    """
    ops = parse_strategy(strategy)
    p = params.scaled(strength)
    fns = [OP_FNS[o] for o in ops]
    if all_ops:
        for i, f in enumerate(fns):
            x = f(jax.random.fold_in(key, i + 1), x, p)
        return x
    if len(fns) == 1:
        return fns[0](jax.random.fold_in(key, 1), x, p)
    choice = jax.random.randint(jax.random.fold_in(key, 0), (), 0, len(fns))
    sub = jax.random.fold_in(key, 1)
    return jax.lax.switch(choice, [lambda v, f=f: f(sub, v, p) for f in fns], x)


def flip_translate(key: jax.Array, x: jax.Array, *, strength: float = 1.0) -> jax.Array:
    """Random horizontal flip, then DSA's random translation (its ``crop``)."""
    p = DSAParams().scaled(strength)
    return crop(jax.random.fold_in(key, 2), flip(jax.random.fold_in(key, 1), x, p), p)


def siamese(augment: Augment) -> Augment:
    """``augment`` with one draw of its random parameters shared by every example of a batch.

    DSA's Siamese augmentation (its ``batchmode``): a real batch and a synthetic batch of one
    class, augmented with the same key, undergo the same transform even though their sizes
    differ. ``siamese(a)(key, x)[i] == a(key, x[i:i + 1])[0]`` for every ``i``.
    """
    def shared(key, x):
        # The key is not mapped over, so every example draws the parameters of a batch of one.
        return jax.vmap(lambda xi: augment(key, xi[None])[0])(x)
    return shared


def make_augment(name: str, *, strength: float = 1.0, strategy: str = DEFAULT_STRATEGY,
                 all_ops: bool = False) -> Optional[Augment]:
    """Augmentation by name for the training code: ``'none'`` -> None, ``'dsa'``,
    ``'flip_translate'`` (``'flip_crop'``: its earlier name).

    The result is ``augment(key, x) -> x``, pure and jit/vmap/grad-friendly.
    """
    name = ALIASES.get(name, name)
    if name not in AUGMENTATIONS:
        raise ValueError(f"augmentation {name!r} is unknown; allowed: {', '.join(AUGMENTATIONS)}")
    if not (isinstance(strength, (int, float)) and math.isfinite(strength) and strength >= 0):
        raise ValueError(f"augmentation strength must be a finite number >= 0, got {strength!r}")
    if name == "none":
        return None
    if name == "flip_translate":
        return lambda key, x: flip_translate(key, x, strength=strength)
    parse_strategy(strategy)  # fail at build time, not inside a trace

    def augment(key, x):
        return dsa(key, x, strategy=strategy, strength=strength, all_ops=all_ops)
    return augment
