"""Distilled sets on disk: ``distilled.npz`` (save, load with validation), compatibility, images.

``distilled.npz`` holds (no pickled objects)::

    images        (N, H, W, C) float32   the training images, in model input space (decoded if
                                          multi-formation was used)
    labels        (N,) int32
    lr            () float32             the learned step size
    stored_images (n, H, W, C) float32   what was optimised (== images unless factor > 1)
    stored_labels (n,) int32
    factor        () int32               multi-formation factor
    prep_kind     () str                 'none' | 'standard' | 'zca'
    prep_mean, prep_std (C,) float32
    prep_zca_mean (D,), prep_zca_W, prep_zca_W_inv (D, D) float32, prep_zca_eps ()   [zca only]
    dataset       () str                 dataset name (e.g. 'fashion_mnist')
    meta          () str                 JSON: model, distillation settings, cost accounting

``load_distilled`` checks keys, dtypes, shapes and finiteness and names the file in every error;
``check_compatible`` checks that a set lives in the same input space as a ``Dataset``.
"""

from __future__ import annotations

import dataclasses
import io as _io
import json
import math
import os
from typing import Any

import numpy as np

from dp_jax.system import figures
from dp_jax.storage import fileio, npz
from dp_jax.data import preprocess as pre

REQUIRED_KEYS = ("images", "labels", "lr", "prep_kind", "prep_mean", "prep_std", "dataset")
ZCA_KEYS = ("prep_zca_mean", "prep_zca_W", "prep_zca_W_inv")


@dataclasses.dataclass(frozen=True, eq=False)
class DistilledSet:
    """A distilled training set and where it came from.

    ``images``/``labels`` are what a network trains on (model input space); ``lr`` is the learned
    step size; ``preprocessing`` is a dict in the format of ``dp_jax.data.preprocess`` (with the
    ZCA arrays when kind is 'zca'); ``cost`` is ``{expert_examples, expert_wall_s,
    distill_examples, distill_wall_s}``.
    """
    images: np.ndarray
    labels: np.ndarray
    lr: float
    preprocessing: dict
    dataset: str
    stored_images: np.ndarray | None = None
    stored_labels: np.ndarray | None = None
    factor: int = 1
    meta: dict = dataclasses.field(default_factory=dict)
    cost: dict = dataclasses.field(default_factory=dict)

    @property
    def image_shape(self) -> tuple:
        """(H, W, C)."""
        return tuple(self.images.shape[1:])

    def __len__(self) -> int:
        return int(self.images.shape[0])


def preprocessing_arrays(prep: dict) -> dict[str, np.ndarray]:
    """The ``prep_*`` arrays that describe a preprocessing dict (as stored in npz files)."""
    out = {"prep_kind": np.array(prep["kind"]),
           "prep_mean": np.asarray(prep["mean"], np.float32),
           "prep_std": np.asarray(prep["std"], np.float32)}
    if prep["kind"] == "zca":
        out.update(prep_zca_mean=np.asarray(prep["zca_mean"], np.float32),
                   prep_zca_W=np.asarray(prep["zca_W"], np.float32),
                   prep_zca_W_inv=np.asarray(prep["zca_W_inv"], np.float32),
                   prep_zca_eps=np.asarray(prep.get("zca_eps", 0.1), np.float32))
    return out


def preprocessing_from_arrays(arrays: dict) -> dict:
    """Inverse of :func:`preprocessing_arrays`."""
    prep = {"kind": str(arrays["prep_kind"]),
            "mean": np.asarray(arrays["prep_mean"]).tolist(),
            "std": np.asarray(arrays["prep_std"]).tolist()}
    if prep["kind"] == "zca":
        prep.update(zca_eps=float(arrays["prep_zca_eps"]) if "prep_zca_eps" in arrays else 0.1,
                    zca_mean=np.asarray(arrays["prep_zca_mean"]),
                    zca_W=np.asarray(arrays["prep_zca_W"]),
                    zca_W_inv=np.asarray(arrays["prep_zca_W_inv"]))
    return prep


def compare_preprocessing(a: dict, b: dict, *, rtol: float = 1e-4, atol: float = 1e-5) -> list[str]:
    """Differences between two preprocessing dicts (empty if equivalent within tolerance)."""
    if a["kind"] != b["kind"]:
        return [f"kind {a['kind']!r} vs {b['kind']!r}"]
    diffs = []
    for key in ("mean", "std") + (("zca_mean", "zca_W") if a["kind"] == "zca" else ()):
        u, v = np.asarray(a[key], np.float64), np.asarray(b[key], np.float64)
        if u.shape != v.shape:
            diffs.append(f"{key} shape {u.shape} vs {v.shape}")
        elif not np.allclose(u, v, rtol=rtol, atol=atol):
            diffs.append(f"{key} differs (max |diff| {np.max(np.abs(u - v)):.3g})")
    return diffs


def save_distilled(path: str, ds: DistilledSet) -> None:
    """Write ``ds`` to ``path`` atomically (format in the module docstring)."""
    stored = ds.images if ds.stored_images is None else ds.stored_images
    stored_labels = ds.labels if ds.stored_labels is None else ds.stored_labels
    arrays = {"images": np.asarray(ds.images, np.float32),
              "labels": np.asarray(ds.labels, np.int32),
              "lr": np.asarray(ds.lr, np.float32),
              "stored_images": np.asarray(stored, np.float32),
              "stored_labels": np.asarray(stored_labels, np.int32),
              "factor": np.asarray(ds.factor, np.int32),
              "dataset": np.array(ds.dataset),
              "meta": np.array(json.dumps(fileio._jsonable(dict(ds.meta, cost=ds.cost)),
                                          sort_keys=True))}
    arrays.update(preprocessing_arrays(ds.preprocessing))
    buf = _io.BytesIO()
    np.savez(buf, **arrays)
    fileio.atomic_write_bytes(path, buf.getvalue())


def load_distilled(path: str) -> DistilledSet:
    """Read and validate a ``distilled.npz``; ValueError naming the file on any problem."""
    if not os.path.isfile(path):
        raise ValueError(f"distilled set {path}: no such file")
    arrays = npz.read(path, "distilled set")
    missing = [k for k in REQUIRED_KEYS if k not in arrays]
    if missing:
        raise ValueError(f"distilled set {path} lacks keys {missing} (has {sorted(arrays)})")
    images, labels, lr = arrays["images"], arrays["labels"], arrays["lr"]
    if images.dtype != np.float32 or images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"distilled set {path}: 'images' must be a non-empty float32 array "
                         f"(N, H, W, C); got dtype {images.dtype} shape {images.shape}")
    if not np.issubdtype(labels.dtype, np.integer) or labels.shape != images.shape[:1]:
        raise ValueError(f"distilled set {path}: 'labels' must be integers of shape "
                         f"{images.shape[:1]}; got dtype {labels.dtype} shape {labels.shape}")
    if labels.min() < 0:
        raise ValueError(f"distilled set {path}: negative labels")
    if lr.shape != () or not np.issubdtype(lr.dtype, np.floating):
        raise ValueError(f"distilled set {path}: 'lr' must be a float scalar; got dtype "
                         f"{lr.dtype} shape {lr.shape}")
    if not np.isfinite(images).all():
        raise ValueError(f"distilled set {path}: 'images' contains NaN or inf")
    if not (math.isfinite(float(lr)) and float(lr) > 0):
        raise ValueError(f"distilled set {path}: 'lr' must be finite and > 0, got {float(lr)}")
    kind = str(arrays["prep_kind"])
    if kind not in pre.PREPROCESS_KINDS:
        raise ValueError(f"distilled set {path}: unknown preprocessing kind {kind!r}")
    c = images.shape[-1]
    for k in ("prep_mean", "prep_std"):
        if arrays[k].shape != (c,) or not np.isfinite(arrays[k]).all():
            raise ValueError(f"distilled set {path}: {k!r} must be {c} finite values, got "
                             f"shape {arrays[k].shape}")
    if kind == "zca":
        d = int(np.prod(images.shape[1:]))
        for k, shape in zip(ZCA_KEYS, ((d,), (d, d), (d, d))):
            if k not in arrays:
                raise ValueError(f"distilled set {path}: preprocessing 'zca' but key {k!r} is missing")
            if arrays[k].shape != shape or not np.isfinite(arrays[k]).all():
                raise ValueError(f"distilled set {path}: {k!r} must be finite with shape {shape}, "
                                 f"got {arrays[k].shape}")
    meta: dict[str, Any] = {}
    if "meta" in arrays:
        try:
            meta = json.loads(str(arrays["meta"]))
        except json.JSONDecodeError as e:
            raise ValueError(f"distilled set {path}: 'meta' is not valid JSON: {e}") from e
    stored = arrays.get("stored_images", images)
    stored_labels = arrays.get("stored_labels", labels)
    factor = int(arrays.get("factor", 1))
    if stored.shape[1:] != images.shape[1:] or stored.shape[0] * factor ** 2 != images.shape[0]:
        raise ValueError(f"distilled set {path}: 'stored_images' {stored.shape} and factor "
                         f"{factor} do not match 'images' {images.shape}")
    return DistilledSet(images=images, labels=labels.astype(np.int32), lr=float(lr),
                        preprocessing=preprocessing_from_arrays(arrays),
                        dataset=str(arrays["dataset"]), stored_images=stored,
                        stored_labels=np.asarray(stored_labels, np.int32), factor=factor,
                        meta=meta, cost=dict(meta.get("cost", {})))


def check_compatible(distilled: DistilledSet, dataset) -> None:
    """ValueError unless ``distilled`` lives in ``dataset``'s input space and label set.

    Checks the dataset name, image shape, label range and the preprocessing (kind, mean/std and
    ZCA matrices within float tolerance): training on a distilled set and testing on real data
    is only meaningful if both went through the same transform.
    """
    where = f"distilled set (dataset {distilled.dataset!r})"
    if distilled.dataset != dataset.name:
        raise ValueError(f"{where} was made from dataset {distilled.dataset!r}, not "
                         f"{dataset.name!r}")
    if tuple(distilled.image_shape) != tuple(dataset.image_shape):
        raise ValueError(f"{where} has images {distilled.image_shape}, dataset "
                         f"{dataset.image_shape}")
    if int(distilled.labels.max()) >= dataset.num_classes:
        raise ValueError(f"{where} has label {int(distilled.labels.max())} but the dataset has "
                         f"{dataset.num_classes} classes")
    diffs = compare_preprocessing(distilled.preprocessing, dataset.preprocessing)
    if diffs:
        raise ValueError(f"{where} and the dataset use different preprocessing: "
                         + "; ".join(diffs) + " (set data.preprocess / data.train_size as when "
                         "it was distilled, or distil again)")


def save_grid(path: str, ds: DistilledSet, *, num_classes: int | None = None,
              max_per_class: int = 10) -> None:
    """Write a PNG grid (one row per class) of the stored images in pixel space."""

    images = ds.stored_images if ds.stored_images is not None else ds.images
    labels = ds.stored_labels if ds.stored_labels is not None else ds.labels
    pixels = pre.to_pixels(images, ds.preprocessing)
    classes = int(num_classes or labels.max() + 1)
    cols = max(1, min(max_per_class, max(int(np.sum(labels == c)) for c in range(classes))))
    fig, axes = figures.subplots(classes, cols, figsize=(cols * 0.9, classes * 0.9), squeeze=False)
    for c in range(classes):
        idx = np.flatnonzero(labels == c)[:cols]
        for j in range(cols):
            ax = axes[c][j]
            ax.axis("off")
            if j < idx.size:
                img = pixels[idx[j]]
                ax.imshow(img[..., 0] if img.shape[-1] == 1 else img,
                          cmap="gray" if img.shape[-1] == 1 else None, vmin=0, vmax=1)
    fig.suptitle(f"distilled {ds.dataset}: {len(labels)} stored images, lr {ds.lr:.4g}",
                 fontsize=8)
    fig.tight_layout()
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    fileio.atomic_write_bytes(path, buf.getvalue())
