"""Input preprocessing: per-channel standardisation, ZCA whitening and their inverses.

Everything here is plain numpy on NHWC image arrays with pixel values in [0, 1]. Statistics are
accumulated in float64 (sums over tens of thousands of images lose digits in float32); the
transformed images are returned as float32.

A fitted preprocessing is described by a dict (the ``preprocessing`` field of
``dp_jax.data.Dataset``)::

    {"kind": "none" | "standard" | "zca",
     "mean": [per-channel mean], "std": [per-channel std],         # always present
     "zca_eps": float, "zca_mean": (D,), "zca_W": (D, D), "zca_W_inv": (D, D)}   # "zca" only

``"none"`` stores mean 0 and std 1 so every kind can be inverted the same way. ``"zca"`` follows
the MTT pipeline: images are first standardised per channel, then whitened with ZCA fitted on the
standardised training images (D = H*W*C features). The ZCA arrays are numpy arrays;
``describe_preprocessing`` gives a JSON-able summary without them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

PREPROCESS_KINDS = ("standard", "zca", "none")

# A D x D float64 covariance and its eigendecomposition grow as D**2 in memory and D**3 in time;
# 16384 features (e.g. 64x64x4 or 73x73x3) is ~2 GiB per matrix and minutes of eigh on a CPU.
MAX_ZCA_FEATURES = 16384

# Examples (ZCA) and pixels (standardisation) per block, to bound float64 temporaries.
_CHUNK = 4096
_PIXEL_CHUNK = 1 << 18


def _channel_view(x: np.ndarray) -> np.ndarray:
    """Returns ``x`` as a (rows, C) view with channels last."""
    x = np.asarray(x)
    if x.ndim < 1:
        raise ValueError(f"expected an array with a channel axis, got shape {x.shape}")
    return x.reshape(-1, x.shape[-1])


def fit_standard(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and (population) std of ``x`` (..., C), as float32 arrays of shape (C,).

    Channels with (numerically) zero variance get std 1, so standardising leaves them centred
    rather than dividing by zero.
    """
    rows = _channel_view(x)
    if rows.shape[0] == 0:
        raise ValueError("cannot fit standardisation on an empty array")
    n = rows.shape[0]
    total = np.zeros(rows.shape[1], np.float64)
    for i in range(0, n, _PIXEL_CHUNK):
        total += rows[i:i + _PIXEL_CHUNK].sum(axis=0, dtype=np.float64)
    mean = total / n
    # Two passes (mean, then squared deviations) avoid the cancellation of E[x^2] - E[x]^2.
    sq = np.zeros_like(mean)
    for i in range(0, n, _PIXEL_CHUNK):
        d = rows[i:i + _PIXEL_CHUNK].astype(np.float64) - mean
        sq += np.einsum("ij,ij->j", d, d)
    std = np.sqrt(sq / n)
    std = np.where(std > 1e-12, std, 1.0)
    return mean.astype(np.float32), std.astype(np.float32)


def apply_standard(x: np.ndarray, mean: Any, std: Any) -> np.ndarray:
    """Standardises ``x`` (..., C): ``(x - mean) / std`` per channel, float32."""
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    return ((np.asarray(x, np.float32) - mean) / std).astype(np.float32, copy=False)


def invert_standard(x: np.ndarray, mean: Any, std: Any) -> np.ndarray:
    """Inverse of ``apply_standard``: ``x * std + mean`` per channel, float32."""
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    return (np.asarray(x, np.float32) * std + mean).astype(np.float32, copy=False)


def fit_zca(x: np.ndarray, eps: float = 0.1) -> dict[str, np.ndarray]:
    """Fits ZCA whitening on the flattened examples of ``x`` (N, ...).

    Features are the flattened per-example values (H*W*C for images). With the per-feature mean m,
    the unbiased covariance C = (x - m)^T (x - m) / (N - 1) and its eigendecomposition
    C = U diag(s) U^T, returns ``{"mean": m, "W": U diag(1/sqrt(s + eps)) U^T,
    "W_inv": U diag(sqrt(s + eps)) U^T}`` (float32). Whitened data ``(x - m) @ W`` has covariance
    U diag(s / (s + eps)) U^T: ``eps`` damps the directions of small variance instead of blowing
    them up. Raises ValueError above ``MAX_ZCA_FEATURES`` features.
    """
    x = np.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"fit_zca expects a batch of examples (N, ...), got shape {x.shape}")
    n = x.shape[0]
    d = math.prod(x.shape[1:])
    if d > MAX_ZCA_FEATURES:
        raise ValueError(
            f"ZCA whitening on {d} features (example shape {x.shape[1:]}) is too large: the "
            f"limit is {MAX_ZCA_FEATURES} features (a {d}x{d} covariance and "
            "eigendecomposition); use preprocess='standard' or smaller images")
    if n < 2:
        raise ValueError(f"fit_zca needs at least 2 examples, got {n}")
    if eps < 0:
        raise ValueError(f"zca eps must be >= 0, got {eps}")
    flat = x.reshape(n, d)
    mean = np.zeros(d, np.float64)
    for i in range(0, n, _CHUNK):
        mean += flat[i:i + _CHUNK].sum(axis=0, dtype=np.float64)
    mean /= n
    cov = np.zeros((d, d), np.float64)
    for i in range(0, n, _CHUNK):
        block = flat[i:i + _CHUNK].astype(np.float64) - mean
        cov += block.T @ block
    cov /= n - 1
    s, u = np.linalg.eigh(cov)
    # Round-off can make the smallest eigenvalues of a PSD matrix slightly negative.
    s = np.clip(s, 0.0, None)
    if eps == 0 and s.min() <= 0:
        raise ValueError("covariance is singular; ZCA with eps=0 is undefined (use eps > 0)")
    w = (u * (1.0 / np.sqrt(s + eps))) @ u.T
    w_inv = (u * np.sqrt(s + eps)) @ u.T
    return {"mean": mean.astype(np.float32), "W": w.astype(np.float32),
            "W_inv": w_inv.astype(np.float32)}


def _feature_matmul(x: np.ndarray, matrix: np.ndarray, before: np.ndarray | None,
                    after: np.ndarray | None) -> np.ndarray:
    """``(x_flat - before) @ matrix + after`` over flattened examples, in x's shape."""
    x = np.asarray(x, np.float32)
    d = matrix.shape[0]
    suffix_products = [math.prod(x.shape[k:]) for k in range(x.ndim + 1)]
    if d not in suffix_products:
        raise ValueError(
            f"array of shape {x.shape} does not end in a feature block of size {d} (the ZCA was "
            "fitted on examples of that many values)")
    flat = x.reshape(-1, d)
    out = np.empty_like(flat)
    for i in range(0, flat.shape[0], _CHUNK):
        block = flat[i:i + _CHUNK]
        if before is not None:
            block = block - before
        block = block @ matrix
        if after is not None:
            block += after
        out[i:i + _CHUNK] = block
    return out.reshape(x.shape)


def apply_zca(x: np.ndarray, zca: dict[str, np.ndarray]) -> np.ndarray:
    """Whitens ``x`` (N, ...) or a single example with a ``fit_zca`` result, float32."""
    return _feature_matmul(x, np.asarray(zca["W"], np.float32),
                           np.asarray(zca["mean"], np.float32), None)


def invert_zca(x: np.ndarray, zca: dict[str, np.ndarray]) -> np.ndarray:
    """Inverse of ``apply_zca``: ``x @ W_inv + mean`` over flattened examples, float32."""
    return _feature_matmul(x, np.asarray(zca["W_inv"], np.float32), None,
                           np.asarray(zca["mean"], np.float32))


def _zca_from(preprocessing: dict) -> dict[str, np.ndarray]:
    """Extracts the ZCA arrays of a preprocessing dict, or says why it cannot."""
    # describe_preprocessing replaces the arrays by {"shape": ...} placeholders.
    missing = [k for k in ("zca_mean", "zca_W", "zca_W_inv")
               if k not in preprocessing or isinstance(preprocessing[k], dict)]
    if missing:
        raise ValueError(
            f"preprocessing of kind 'zca' lacks {missing}: the ZCA matrices are needed to apply or "
            "invert it (a JSON summary from describe_preprocessing does not carry them)")
    return {"mean": preprocessing["zca_mean"], "W": preprocessing["zca_W"],
            "W_inv": preprocessing["zca_W_inv"]}


def _check_kind(kind: str) -> None:
    if kind not in PREPROCESS_KINDS:
        raise ValueError(f"unknown preprocess {kind!r}; expected one of {list(PREPROCESS_KINDS)}")


def fit_preprocessing(kind: str, x_train: np.ndarray, *, zca_eps: float = 0.1) -> dict:
    """Fits the preprocessing ``kind`` on training pixels ``x_train`` (N, H, W, C) in [0, 1].

    Returns the preprocessing dict described in the module docstring.
    """
    _check_kind(kind)
    channels = np.asarray(x_train).shape[-1]
    if kind == "none":
        return {"kind": "none", "mean": [0.0] * channels, "std": [1.0] * channels}
    mean, std = fit_standard(x_train)
    out = {"kind": kind, "mean": mean.tolist(), "std": std.tolist()}
    if kind == "zca":
        zca = fit_zca(apply_standard(x_train, mean, std), eps=zca_eps)
        out.update(zca_eps=float(zca_eps), zca_mean=zca["mean"], zca_W=zca["W"],
                   zca_W_inv=zca["W_inv"])
    return out


def apply_preprocessing(x: np.ndarray, preprocessing: dict) -> np.ndarray:
    """Maps pixels in [0, 1] (..., H, W, C) into the model input space of ``preprocessing``."""
    kind = preprocessing["kind"]
    _check_kind(kind)
    if kind == "none":
        return np.asarray(x, np.float32)
    out = apply_standard(x, preprocessing["mean"], preprocessing["std"])
    if kind == "zca":
        out = apply_zca(out, _zca_from(preprocessing))
    return out


def to_pixels(x: np.ndarray, preprocessing: dict) -> np.ndarray:
    """Maps model-space images back to displayable pixels: float32 in [0, 1] (clipped).

    Inverse of ``apply_preprocessing`` up to the clipping, for plots of real or distilled images.
    """
    kind = preprocessing["kind"]
    _check_kind(kind)
    out = np.asarray(x, np.float32)
    if kind == "zca":
        out = invert_zca(out, _zca_from(preprocessing))
    if kind in ("standard", "zca"):
        out = invert_standard(out, preprocessing["mean"], preprocessing["std"])
    return np.clip(out, 0.0, 1.0)


def describe_preprocessing(preprocessing: dict) -> dict:
    """JSON-able copy of a preprocessing dict: arrays are replaced by ``{"shape": [...]}``."""
    out = {}
    for key, value in preprocessing.items():
        if isinstance(value, np.ndarray):
            out[key] = {"shape": list(value.shape)}
        elif isinstance(value, np.generic):
            out[key] = value.item()
        else:
            out[key] = value
    return out
