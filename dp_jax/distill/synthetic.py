"""The learnable synthetic set: initialisation from real images or noise, and multi-formation.

Multi-formation (IDC): with factor f, each *stored* image of shape (H, W, C) holds an f x f grid
of (H/f, W/f) tiles; decoding upsamples every tile back to (H, W), so ``n`` stored images give
``n * f**2`` training images with the stored image's label. ``f = 1`` is the identity. Decoding
is linear (bilinear upsampling), so gradients flow from the decoded set to the stored pixels.

Storage order: stored images are grouped by class (``ipc`` consecutive images per class, classes
in increasing order); decoded image ``i * f**2 + r * f + c`` comes from tile (r, c) of stored
image ``i``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

INITS = ("real", "noise")


def decode(images: jax.Array, labels: jax.Array, factor: int) -> tuple[jax.Array, jax.Array]:
    """Stored images (n, H, W, C) -> training images (n f^2, H, W, C) and labels (n f^2,)."""
    if factor == 1:
        return images, labels
    n, h, w, c = images.shape
    th, tw = h // factor, w // factor
    tiles = images.reshape(n, factor, th, factor, tw, c).transpose(0, 1, 3, 2, 4, 5)
    tiles = tiles.reshape(n * factor * factor, th, tw, c)
    up = jax.image.resize(tiles, (tiles.shape[0], h, w, c), method="linear")
    return up, jnp.repeat(labels, factor * factor)


def encode(images: np.ndarray, factor: int) -> np.ndarray:
    """Groups of f^2 full-size images (n f^2, H, W, C) -> stored images (n, H, W, C).

    Each image is downsampled (antialiased bilinear) into one tile, in the order :func:`decode`
    reads them back.
    """
    if factor == 1:
        return np.asarray(images, np.float32)
    m, h, w, c = images.shape
    n = m // (factor * factor)
    th, tw = h // factor, w // factor
    small = jax.image.resize(jnp.asarray(images, jnp.float32), (m, th, tw, c), method="linear",
                             antialias=True)
    grid = small.reshape(n, factor, factor, th, tw, c).transpose(0, 1, 3, 2, 4, 5)
    return np.asarray(grid.reshape(n, h, w, c))


def check_factor(factor: int, image_shape) -> None:
    """ValueError unless ``factor`` >= 1 divides the image height and width."""
    h, w = image_shape[:2]
    if not isinstance(factor, int) or factor < 1 or h % factor or w % factor:
        raise ValueError(f"config.distill.factor={factor!r} is invalid; allowed: a positive integer "
                         f"dividing the image height and width ({h}x{w}), 1 = no multi-formation")


def init_synthetic(x_train: np.ndarray, y_train: np.ndarray, *, ipc: int, num_classes: int,
                   factor: int = 1, init: str = "real", seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Initial stored images and labels.

    Args:
      x_train, y_train: the real training set in model input space.
      ipc: stored images per class.
      num_classes: number of classes.
      factor: multi-formation factor (each stored image starts from f^2 real images).
      init: ``'real'`` (random distinct real images of the class; all of them, repeated, if the
        class has fewer) or ``'noise'`` (standard normal, the scale of standardised inputs).
      seed: which real images / which noise.

    Returns:
      ``(images (ipc*num_classes, H, W, C) float32, labels (ipc*num_classes,) int32)``.
    """
    if init not in INITS:
        raise ValueError(f"config.distill.init={init!r} is invalid; allowed: {', '.join(INITS)}")
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes, dtype=np.int32), ipc)
    shape = x_train.shape[1:]
    if init == "noise":
        return rng.standard_normal((ipc * num_classes,) + shape).astype(np.float32), labels
    need = ipc * factor * factor
    chosen = []
    for c in range(num_classes):
        idx = np.flatnonzero(np.asarray(y_train) == c)
        if idx.size == 0:
            raise ValueError(f"class {c} has no training examples to initialise from; "
                             "use config.distill.init='noise'")
        pick = rng.permutation(idx)[:need] if idx.size >= need else rng.choice(idx, need)
        chosen.append(np.asarray(x_train[pick], np.float32))
    return encode(np.concatenate(chosen), factor), labels
