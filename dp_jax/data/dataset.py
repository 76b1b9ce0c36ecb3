"""In-memory datasets: loading by name, validation, stratified subsets and preprocessing.

``load_dataset(cfg, seed=...)`` is the single entry point the rest of the code uses; it returns a
``Dataset`` whose images are already in model input space (see ``dp_jax.data.preprocess``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping


import numpy as np

from dp_jax.data import preprocess as pre
from dp_jax.data import registry
from dp_jax.data.sources import RawData
from dp_jax.data.spec import DataSpec

@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """Train and test splits in model input space plus the preprocessing that put them there.

    x arrays are float32 NHWC, y arrays int32 (N,). ``preprocessing`` is the dict described in
    ``dp_jax.data.preprocess`` (invert it with ``preprocess.to_pixels``).
    """
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    preprocessing: dict
    source: str = ""  # where the data was read from (recorded in config.json and summary.json)

    @property
    def image_shape(self) -> tuple:
        """(H, W, C) of one image."""
        return tuple(self.x_train.shape[1:])


def stratified_indices(labels: np.ndarray, size: int, *, num_classes: int,
                       seed: int) -> np.ndarray:
    """Sorted indices of a class-balanced random subset of ``size`` examples.

    Every class gets ``size // num_classes`` examples; a class with fewer examples gives all it
    has and its shortfall is shared among the others in the same way. What cannot be split evenly
    goes one example each to the lowest-numbered classes that still have examples to spare. Which
    examples of a class are taken depends only on ``seed``.
    """
    labels = np.asarray(labels)
    if size > labels.shape[0]:
        raise ValueError(f"subset of {size} examples requested from {labels.shape[0]}")
    counts = np.bincount(labels, minlength=num_classes)[:num_classes]
    quota = np.zeros(num_classes, np.int64)
    open_classes = [c for c in range(num_classes) if counts[c] > 0]
    remaining = size
    while open_classes:
        share = remaining // len(open_classes)
        full = [c for c in open_classes if counts[c] <= share]
        if not full:
            for c in open_classes:
                quota[c] = share
            for c in open_classes[:remaining - share * len(open_classes)]:
                quota[c] += 1
            break
        for c in full:
            quota[c] = counts[c]
            remaining -= counts[c]
        open_classes = [c for c in open_classes if c not in full]
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:quota[c]] for c in range(num_classes)]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def _to_unit_float(x: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 in [0, 1]; float images are taken as already in [0, 1]."""
    if x.dtype == np.uint8:
        return x.astype(np.float32) / np.float32(255.0)
    return x.astype(np.float32)


def _validate(raw: RawData) -> None:
    """Checks shared by all sources: non-empty splits, finite images, labels in range."""
    where = raw.source
    if raw.num_classes < 2:
        raise ValueError(f"{where}: a classification dataset needs at least 2 classes, found "
                         f"num_classes={raw.num_classes}")
    for split in ("train", "test"):
        x, y = getattr(raw, f"x_{split}"), getattr(raw, f"y_{split}")
        if x.shape[0] == 0 or y.shape[0] == 0:
            raise ValueError(f"{where}: the {split} split is empty")
        if x.ndim != 4:
            raise ValueError(f"{where}: x_{split} must be NHWC, got shape {x.shape}")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{where}: {x.shape[0]} {split} images but {y.shape[0]} labels")
        if np.issubdtype(x.dtype, np.floating):
            if not np.isfinite(x).all():
                raise ValueError(f"{where}: x_{split} contains NaN or inf")
            # Float pixels are taken as [0, 1]; 0-255 floats would silently train on a
            # 255x brighter image, so anything outside [0, 1] is refused.
            if x.min() < 0.0 or x.max() > 1.0:
                raise ValueError(f"{where}: x_{split} is float with values in [{x.min():.4g}, "
                                 f"{x.max():.4g}]; allowed: uint8 pixels 0-255 or float pixels "
                                 "in [0, 1]")
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= raw.num_classes:
            raise ValueError(f"{where}: {split} labels must lie in [0, {raw.num_classes}), found "
                             f"range [{lo}, {hi}]")
    unseen = sorted(set(np.unique(raw.y_test).tolist()) - set(np.unique(raw.y_train).tolist()))
    if unseen:
        raise ValueError(f"{where}: test labels {unseen[:10]} never occur in the training split; "
                         "allowed: test classes that are training classes")
    if raw.x_train.shape[1:] != raw.x_test.shape[1:]:
        raise ValueError(f"{where}: train images {raw.x_train.shape[1:]} and test images "
                         f"{raw.x_test.shape[1:]} differ in shape")


def select_classes(raw: RawData, classes) -> RawData:
    """The examples of ``classes`` (``data.classes``), relabelled 0..len(classes)-1 in list
    order, as the stream pipeline's ``ClassSubset`` does."""
    classes = [int(c) for c in classes]
    if len(set(classes)) != len(classes) or not all(0 <= c < raw.num_classes for c in classes):
        raise ValueError(f"config.data.classes={tuple(classes)} is invalid; allowed: distinct "
                         f"class indices in [0, {raw.num_classes}) (the classes of {raw.source})")
    remap = np.full(raw.num_classes, -1, np.int64)
    remap[classes] = np.arange(len(classes))
    keep_train, keep_test = remap[raw.y_train] >= 0, remap[raw.y_test] >= 0
    return raw._replace(x_train=raw.x_train[keep_train], y_train=remap[raw.y_train[keep_train]],
                        x_test=raw.x_test[keep_test], y_test=remap[raw.y_test[keep_test]],
                        num_classes=len(classes))


def _check_present_classes(raw: RawData, spec: DataSpec) -> None:
    """At least two classes have training examples (labels 0..num_classes-1 may have gaps:
    one label of 1 passes the range check yet gives a one-class problem)."""
    present = np.unique(raw.y_train)
    field = "data.classes" if spec.classes else "data.name"
    value = tuple(spec.classes) if spec.classes else spec.name
    if present.size < 2:
        raise ValueError(f"config.{field}={value!r} is invalid: the training split has examples "
                         f"of {present.size} class (labels {present.tolist()}); allowed: a "
                         "dataset with examples of at least 2 classes")
    if raw.x_test.shape[0] == 0:
        raise ValueError(f"config.{field}={value!r} is invalid: it leaves the test split "
                         "empty; allowed: classes with test examples")


def load_dataset(data: DataSpec | Mapping, *, seed: int) -> Dataset:
    """Loads, validates, subsets and preprocesses the dataset described by ``data``.

    ``data`` is a :class:`DataSpec` or a mapping of its fields (missing ones take the default):
    ``name`` ('fashion_mnist', 'tfds:<name>' or
    'npz:<path>'), ``data_dir`` (None), ``train_size`` (0 = whole training split, otherwise a
    class-balanced subset drawn with ``seed``), ``preprocess`` ('standard'; or 'zca', 'none'),
    ``zca_eps`` (0.1), ``classes`` (label indices to keep, relabelled 0..n-1 in list order;
    ``()`` = all) and, for TFDS datasets with images of varying size, ``image_size`` (None).
    Preprocessing is fitted on the (subset) training split and applied to both splits.
    """
    spec = data if isinstance(data, DataSpec) else DataSpec.from_config(data)
    name = spec.name
    train_size = int(spec.train_size or 0)
    kind, zca_eps = spec.preprocess, float(spec.zca_eps)
    # Configuration errors are reported before any (possibly slow) loading.
    if kind not in pre.PREPROCESS_KINDS:
        raise ValueError(
            f"unknown preprocess {kind!r}; expected one of {list(pre.PREPROCESS_KINDS)}")
    if train_size < 0:
        raise ValueError(f"train_size must be >= 0 (0 = all), got {train_size}")
    raw = registry.load(spec)
    _validate(raw)
    if spec.classes:
        raw = select_classes(raw, spec.classes)
    _check_present_classes(raw, spec)
    x_train, y_train = raw.x_train, raw.y_train
    if train_size:
        n = x_train.shape[0]
        if train_size > n:
            raise ValueError(f"{raw.source}: train_size={train_size} exceeds the {n} examples "
                             "of the training split")
        if train_size < raw.num_classes:
            raise ValueError(f"{raw.source}: train_size={train_size} is smaller than num_classes="
                             f"{raw.num_classes} (need at least one example per class)")
        idx = stratified_indices(y_train, train_size, num_classes=raw.num_classes, seed=seed)
        x_train, y_train = x_train[idx], y_train[idx]

    x_train = _to_unit_float(x_train)
    x_test = _to_unit_float(raw.x_test)
    preprocessing = pre.fit_preprocessing(kind, x_train, zca_eps=zca_eps)
    return Dataset(
        name=name,
        x_train=pre.apply_preprocessing(x_train, preprocessing),
        y_train=y_train.astype(np.int32),
        x_test=pre.apply_preprocessing(x_test, preprocessing),
        y_test=raw.y_test.astype(np.int32),
        num_classes=int(raw.num_classes),
        preprocessing=preprocessing, source=raw.source)
