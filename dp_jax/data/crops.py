"""Random crops and flips: numpy versions for the streaming pipeline (pixel space, uint8 in ->
uint8 out) and a jittable crop+flip for the in-memory trainer.

  ``crop_flip``            CIFAR: zero-pad 4 px, random crop back to H x W, horizontal flip p=0.5;
  ``random_resized_crop``  ImageNet: Inception-style crop (area 8-100%, aspect 3/4-4/3,
                           10 attempts, else a centre crop) resized to ``size``, flip p=0.5;
  ``device_crop_flip``     the jittable crop+flip (``Trainer(augment=...)``) for datasets such as
                           CIFAR that fit on the device.
"""

from __future__ import annotations

import numpy as np

_RRC_ATTEMPTS = 10
_RRC_SCALE = (0.08, 1.0)
_RRC_RATIO = (3 / 4, 4 / 3)



def crop_flip(images: np.ndarray, offsets: np.ndarray, flips: np.ndarray, pad: int = 4) -> np.ndarray:
    """Zero-pad by ``pad`` px, crop H x W at ``offsets`` (b, 2) in [0, 2*pad], flip where ``flips``."""
    b, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    rows = offsets[:, 0, None] + np.arange(h)           # (b, h)
    cols = offsets[:, 1, None] + np.arange(w)           # (b, w)
    cols = np.where(flips[:, None], cols[:, ::-1], cols)  # a flip is a reversed column order
    return padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]


def crop_flip_params(rng: np.random.Generator, b: int, pad: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Offsets (b, 2) and flips (b,) for :func:`crop_flip`."""
    return rng.integers(0, 2 * pad + 1, size=(b, 2)), rng.random(b) < 0.5


def rrc_params(rng: np.random.Generator, b: int) -> np.ndarray:
    """Uniforms (b, attempts, 5) for :func:`random_resized_crop`; [:, 0, 4] decides the flip."""
    return rng.random((b, _RRC_ATTEMPTS, 5))


def rrc_box(h: int, w: int, u: np.ndarray) -> tuple[int, int, int, int]:
    """(top, left, height, width) of an Inception crop of an h x w image from uniforms ``u``."""
    area = h * w
    log_lo, log_hi = np.log(_RRC_RATIO[0]), np.log(_RRC_RATIO[1])
    for a in range(u.shape[0]):
        target = area * (_RRC_SCALE[0] + u[a, 0] * (_RRC_SCALE[1] - _RRC_SCALE[0]))
        ratio = np.exp(log_lo + u[a, 1] * (log_hi - log_lo))
        cw = int(round(np.sqrt(target * ratio)))
        ch = int(round(np.sqrt(target / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            top = min(int(u[a, 2] * (h - ch + 1)), h - ch)
            left = min(int(u[a, 3] * (w - cw + 1)), w - cw)
            return top, left, ch, cw
    # Fallback: the largest centred crop whose aspect ratio is inside the allowed range.
    ratio = w / h
    if ratio < _RRC_RATIO[0]:
        cw, ch = w, int(round(w / _RRC_RATIO[0]))
    elif ratio > _RRC_RATIO[1]:
        ch, cw = h, int(round(h * _RRC_RATIO[1]))
    else:
        ch, cw = h, w
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def random_resized_crop(image: np.ndarray, size: int, u: np.ndarray) -> np.ndarray:
    """Inception-style crop of ``image`` (H, W, C) uint8 to ``size`` x ``size``, maybe flipped."""
    from PIL import Image  # pylint: disable=import-outside-toplevel

    top, left, ch, cw = rrc_box(image.shape[0], image.shape[1], u)
    crop = image[top:top + ch, left:left + cw]
    c = crop.shape[2]
    planes = crop[..., 0] if c == 1 else crop
    out = np.asarray(Image.fromarray(planes).resize((size, size), Image.Resampling.BILINEAR))
    out = out.reshape(size, size, c)
    return out[:, ::-1] if u[0, 4] < 0.5 else out


def device_crop_flip(key, x, pad: int = 4):
    """Jittable random crop (zero padding ``pad``) + horizontal flip of a batch NHWC.

    For ``Trainer(augment=device_crop_flip)`` on in-memory data. The batch is
    already normalised, so padding with 0 pads with the channel mean (standard)
    or the whitened mean (ZCA) rather than black.
    """
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

    b, h, w, _ = x.shape
    k_off, k_flip = jax.random.split(key)
    off = jax.random.randint(k_off, (b, 2), 0, 2 * pad + 1)
    flip = jax.random.bernoulli(k_flip, 0.5, (b,))
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

    def one(img, o, f):
        crop = jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, img.shape[-1]))
        return jnp.where(f, crop[:, ::-1], crop)
    return jax.vmap(one)(padded, off, flip)
