"""The distilled-set file (``distilled.npz``): save, load with validation, compatibility.

A distilled set is what Distilled Pruning trains on. Any method may produce it
(MTT here, or sets made by other code), as long as the file holds:

  images          (N, H, W, C) float32, in the *model input space* (preprocessed)
  labels          (N,) integer class indices
  lr              scalar float, the learned (or recommended) step size
  preprocess_kind "standard" | "zca" | "none"
  mean, std       per-channel normalisation the images live in
  zca_mean, zca_W, zca_W_inv   only for "zca"
  dataset         name of the real dataset it was distilled from (optional)

Training the mask on whitened synthetic images and evaluating on un-whitened real
data is a known defect of earlier code; :func:`check_compatible` refuses it.
"""

from __future__ import annotations

import dataclasses
import io as _io
import zipfile
from typing import Any

import numpy as np

from dp_jax import io

REQUIRED = ("images", "labels", "lr", "preprocess_kind", "mean", "std")


@dataclasses.dataclass(frozen=True)
class DistilledSet:
    """Synthetic images and labels in model input space, a step size, their preprocessing."""
    images: np.ndarray
    labels: np.ndarray
    lr: float
    preprocessing: dict
    dataset: str = ""
    cost: dict = dataclasses.field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        """Number of classes present."""
        return int(self.labels.max()) + 1


def save(path: str, dset: DistilledSet) -> None:
    """Write ``dset`` to ``path`` atomically."""
    p = dset.preprocessing
    arrays: dict[str, Any] = {
        "images": np.asarray(dset.images, np.float32), "labels": np.asarray(dset.labels, np.int32),
        "lr": np.float32(dset.lr), "preprocess_kind": np.array(p.get("kind", "none")),
        "mean": np.asarray(p.get("mean", 0.0), np.float32),
        "std": np.asarray(p.get("std", 1.0), np.float32), "dataset": np.array(dset.dataset)}
    if p.get("kind") == "zca":
        for k in ("zca_mean", "zca_W", "zca_W_inv"):
            arrays[k] = np.asarray(p[k], np.float32)
        arrays["zca_eps"] = np.float32(p.get("zca_eps", 0.0))
    buf = _io.BytesIO()
    np.savez(buf, **arrays)
    io.atomic_write_bytes(path, buf.getvalue())


def load(path: str) -> DistilledSet:
    """Read and validate a distilled set; ValueError naming the file and the problem."""
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"distilled set {path} is unreadable or truncated: {e}") from e
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise ValueError(f"distilled set {path} lacks {missing}; it needs {list(REQUIRED)}")
    images, labels = data["images"], data["labels"]
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"distilled set {path}: images must be (N, H, W, C) with N > 0, "
                         f"got shape {images.shape}")
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"distilled set {path}: images must be float, got {images.dtype}")
    if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"distilled set {path}: labels must be ({images.shape[0]},) integers, "
                         f"got {labels.shape} {labels.dtype}")
    if labels.min() < 0:
        raise ValueError(f"distilled set {path}: negative labels")
    if not np.all(np.isfinite(images)):
        raise ValueError(f"distilled set {path}: images contain NaN or inf")
    lr = float(data["lr"])
    if not (np.isfinite(lr) and lr > 0):
        raise ValueError(f"distilled set {path}: lr must be a positive number, got {lr}")
    kind = str(data["preprocess_kind"])
    pre = {"kind": kind, "mean": data["mean"].tolist(), "std": data["std"].tolist()}
    if kind == "zca":
        for k in ("zca_mean", "zca_W", "zca_W_inv"):
            if k not in data:
                raise ValueError(f"distilled set {path}: ZCA preprocessing without {k!r}")
            pre[k] = data[k]
        pre["zca_eps"] = float(data.get("zca_eps", 0.0))
    return DistilledSet(images=images.astype(np.float32), labels=labels.astype(np.int32), lr=lr,
                        preprocessing=pre, dataset=str(data.get("dataset", "")))


def check_compatible(dset: DistilledSet, dataset) -> None:
    """Refuse a distilled set that does not live in ``dataset``'s input space and classes."""
    if tuple(dset.images.shape[1:]) != tuple(dataset.image_shape):
        raise ValueError(f"distilled images have shape {dset.images.shape[1:]}, the dataset "
                         f"{dataset.name} has {dataset.image_shape}")
    if dset.num_classes > dataset.num_classes:
        raise ValueError(f"distilled labels go up to {dset.num_classes - 1}; the dataset has "
                         f"{dataset.num_classes} classes")
    a, b = dset.preprocessing, dataset.preprocessing
    if a.get("kind") != b.get("kind"):
        raise ValueError(f"the distilled set lives in {a.get('kind')!r} preprocessing but the "
                         f"dataset uses {b.get('kind')!r} (set data.preprocess to match): training "
                         "masks and evaluating them in different input spaces is invalid")
    for k in ("mean", "std"):
        if not np.allclose(np.asarray(a.get(k), np.float64), np.asarray(b.get(k), np.float64),
                           rtol=1e-3, atol=1e-4):
            raise ValueError(f"the distilled set's normalisation {k} {a.get(k)} differs from the "
                             f"dataset's {b.get(k)}: it was made from other data")
    if a.get("kind") == "zca" and not np.allclose(np.asarray(a["zca_W"]), np.asarray(b["zca_W"]),
                                                  rtol=1e-3, atol=1e-4):
        raise ValueError("the distilled set's ZCA whitening differs from the dataset's")
