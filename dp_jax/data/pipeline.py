"""Streaming input pipeline for datasets that do not fit in memory (ImageNet subsets).

A ``HostIterator`` reads examples by index from a random-access source (a
``tfds.data_source``: ArrayRecord files, no TensorFlow), augments them in numpy
on a background thread and hands out batches through a bounded queue, so the
host prepares step t+1 while the devices run step t.

Determinism contract (mirrors ``dp_jax.training.trainer``'s in-memory loop). With ``S``
steps per epoch, global batch ``B`` and ``P`` processes, the global batch of
step ``t`` is::

    perm_e[(t mod S) * B : (t mod S + 1) * B],   e = t // S,
    perm_e = permutation(n) drawn from numpy's PCG64 seeded with (seed, 0, e)

(the last partial batch of an epoch is dropped) and process ``p`` feeds rows
``[p*B/P, (p+1)*B/P)`` of it. Augmentation parameters are drawn for the whole
global batch from (seed, 1, t) and sliced the same way. A batch therefore
depends only on (seed, t): shards of different hosts are disjoint and together
form the single-host batch, and neither the prefetch depth, the worker count nor
a restart at step t changes any pixel.

Augmentations (in pixel space, before normalisation):
  ``crop_flip``            CIFAR: zero-pad 4 px, random crop back to H x W, horizontal flip p=0.5;
  ``random_resized_crop``  ImageNet: Inception-style crop (area 8-100%, aspect 3/4-4/3,
                           10 attempts, else a centre crop) resized to ``image_size``, flip p=0.5;
  ``none``                 evaluation view: centre square crop resized to ``image_size``
                           (the same transform ``dp_jax.data.sources`` applies in memory).

The crops themselves live in :mod:`dp_jax.data.crops` (with ``device_crop_flip``, the
jittable crop+flip of the in-memory trainer).
"""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from dp_jax.data import preprocess as pre
from dp_jax.data.crops import crop_flip, crop_flip_params, random_resized_crop, rrc_params
from dp_jax.data.sources import _center_crop_resize
from dp_jax.data.spec import DataSpec

AUGMENTATIONS = ("none", "crop_flip", "random_resized_crop")
# Stream ids of the seeded generators: one per purpose, so they never share draws.
_PERM_STREAM, _AUG_STREAM, _SAMPLE_STREAM = 0, 1, 2


# ---------------------------------------------------------------------------------------------
# Sources

def read_examples(source: Any, indices: Sequence[int]) -> list[dict]:
    """Examples ``indices`` of a random-access source, batched where the source supports it."""
    keys = [int(i) for i in indices]
    if hasattr(source, "__getitems__"):
        try:
            return list(source.__getitems__(keys))
        except TypeError:  # mocked sources expose but do not implement batched reads
            pass
    return [source[i] for i in keys]


def read_labels(source: Any, *, cache_path: Optional[str] = None, chunk: int = 1024) -> np.ndarray:
    """All labels of ``source`` as int64, cached in ``cache_path`` (.npy) when given.

    Without TensorFlow a TFDS record cannot be read without decoding its image, so
    the first call over ImageNet decodes every image once (about an hour of one
    core for 1.28M images); the cache makes later runs instant.
    """
    if cache_path and os.path.exists(cache_path):
        labels = np.load(cache_path)
        if labels.shape == (len(source),):
            return labels
    labels = np.empty(len(source), np.int64)
    for s in range(0, len(source), chunk):
        idx = range(s, min(len(source), s + chunk))
        labels[s:s + len(idx)] = [int(ex["label"]) for ex in read_examples(source, idx)]
    if cache_path:
        os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
        tmp = cache_path + f".tmp{os.getpid()}.npy"
        np.save(tmp, labels)
        os.replace(tmp, cache_path)
    return labels


class ClassSubset:
    """The examples of ``classes`` in ``source``, relabelled 0..len(classes)-1 in list order.

    Random access like the wrapped source (``len``, ``[i]``, ``__getitems__``).
    """

    def __init__(self, source: Any, classes: Sequence[int], labels: np.ndarray):
        classes = [int(c) for c in classes]
        if len(set(classes)) != len(classes):
            raise ValueError(f"data.classes lists a class twice: {classes}")
        self.source = source
        self.classes = classes
        self.index = np.flatnonzero(np.isin(labels, classes))
        remap = {c: i for i, c in enumerate(classes)}
        self._labels = np.asarray([remap[int(c)] for c in labels[self.index]], np.int64)
        if len(self.index) == 0:
            raise ValueError(f"data.classes={classes} selects no examples")

    def __len__(self) -> int:
        return len(self.index)

    def _relabel(self, i: int, ex: dict) -> dict:
        return dict(ex, label=self._labels[i])

    def __getitem__(self, i: int) -> dict:
        return self._relabel(i, self.source[int(self.index[i])])

    def __getitems__(self, keys: Sequence[int]) -> list[dict]:
        examples = read_examples(self.source, [int(self.index[k]) for k in keys])
        return [self._relabel(k, ex) for k, ex in zip(keys, examples)]


def evenly_spaced_classes(num: int, total: int) -> tuple[int, ...]:
    """``num`` class indices spread evenly over ``0..total-1`` (a reproducible subset)."""
    if not 0 < num <= total:
        raise ValueError(f"cannot pick {num} of {total} classes")
    return tuple(int(i * total // num) for i in range(num))


# ---------------------------------------------------------------------------------------------
# The host iterator

@dataclasses.dataclass(frozen=True)
class Batch:
    """One host's share of global step ``step``: images in model space and int32 labels."""
    step: int
    x: np.ndarray
    y: np.ndarray


_END = object()


class HostIterator:
    """Batches of one host for global steps ``start_step .. num_steps-1``, prefetched.

    Args:
      source: random-access examples (``len``, ``[i]``) with ``image`` (H, W, C) uint8
        and ``label``; a ``tfds.data_source`` split or a :class:`ClassSubset`.
      global_batch_size: batch size summed over all processes.
      seed: data-order and augmentation seed.
      num_steps: global step to stop at (None: endless).
      start_step: first global step (resume).
      augment: one of ``AUGMENTATIONS``.
      image_size: output side for ``random_resized_crop``/``none`` (None keeps the
        stored size; then images must share one shape).
      preprocessing: a dict from ``dp_jax.data.preprocess.fit_preprocessing`` applied to
        the [0, 1] images (None: leave them in [0, 1]).
      process_index, process_count: this host's shard (default: from JAX).
      prefetch: batches held ready in the queue (bounds host memory).
      num_workers: threads decoding/augmenting the examples of one batch.
    """

    def __init__(self, source: Any, *, global_batch_size: int, seed: int,
                 num_steps: Optional[int] = None, start_step: int = 0, augment: str = "none",
                 image_size: Optional[int] = None, preprocessing: Optional[dict] = None,
                 process_index: Optional[int] = None, process_count: Optional[int] = None,
                 prefetch: int = 2, num_workers: int = 1):
        if augment not in AUGMENTATIONS:
            raise ValueError(f"data.augment={augment!r} is invalid; allowed: "
                             + " | ".join(AUGMENTATIONS))
        if process_index is None or process_count is None:
            import jax  # pylint: disable=import-outside-toplevel
            process_index, process_count = jax.process_index(), jax.process_count()
        if global_batch_size % process_count:
            raise ValueError(f"config.train.batch_size={global_batch_size} is invalid; allowed: "
                             f"a multiple of the {process_count} processes")
        self.source, self.n = source, len(source)
        if global_batch_size > self.n:
            raise ValueError(f"config.train.batch_size={global_batch_size} is larger than the "
                             f"{self.n} training examples")
        self.global_batch_size = int(global_batch_size)
        self.local_batch_size = self.global_batch_size // process_count
        self.steps_per_epoch = self.n // self.global_batch_size
        self.seed, self.augment, self.image_size = int(seed), augment, image_size
        self.preprocessing = preprocessing
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.start_step, self.num_steps = int(start_step), num_steps
        self.prefetch, self.num_workers = max(int(prefetch), 1), max(int(num_workers), 1)
        self._perm_cache: dict[int, np.ndarray] = {}
        self._queue: Optional[queue.Queue] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._pool = ThreadPoolExecutor(self.num_workers) if self.num_workers > 1 else None

    # -- pure functions of (seed, step) ---------------------------------------------------------

    def permutation(self, epoch: int) -> np.ndarray:
        """The example order of ``epoch``."""
        if epoch not in self._perm_cache:
            rng = np.random.default_rng([self.seed, _PERM_STREAM, epoch])
            self._perm_cache = {epoch: rng.permutation(self.n)}  # keep one epoch: O(n) memory
        return self._perm_cache[epoch]

    def _rows(self) -> slice:
        b = self.local_batch_size
        return slice(self.process_index * b, (self.process_index + 1) * b)

    def global_indices(self, step: int) -> np.ndarray:
        """Source indices of the whole global batch of ``step``."""
        epoch, i = divmod(int(step), self.steps_per_epoch)
        B = self.global_batch_size
        return self.permutation(epoch)[i * B:(i + 1) * B]

    def indices(self, step: int) -> np.ndarray:
        """Source indices of this host's share of ``step``."""
        return self.global_indices(step)[self._rows()]

    def batch(self, step: int) -> Batch:
        """This host's batch of ``step``, built synchronously (the thread calls this)."""
        idx = self.indices(step)
        examples = read_examples(self.source, idx)
        labels = np.asarray([int(ex["label"]) for ex in examples], np.int32)
        rng = np.random.default_rng([self.seed, _AUG_STREAM, int(step)])
        B, rows = self.global_batch_size, self._rows()
        images = [np.asarray(ex["image"]) for ex in examples]
        if self.augment == "crop_flip":
            offsets, flips = crop_flip_params(rng, B)
            x = crop_flip(self._stack(images), offsets[rows], flips[rows])
        elif self.augment == "random_resized_crop":
            if not self.image_size:
                raise ValueError("data.augment='random_resized_crop' needs data.image_size")
            u = rrc_params(rng, B)[rows]
            x = np.stack(self._map(lambda a: random_resized_crop(a[0], self.image_size, a[1]),
                                   list(zip(images, u))))
        else:
            x = self._stack(images)
        x = x.astype(np.float32) / np.float32(255.0)
        if self.preprocessing is not None:
            x = pre.apply_preprocessing(x, self.preprocessing)
        return Batch(step=int(step), x=x, y=labels)

    def _map(self, fn, items):
        return list(self._pool.map(fn, items)) if self._pool else [fn(a) for a in items]

    def _stack(self, images: list[np.ndarray]) -> np.ndarray:
        if self.image_size:
            images = self._map(lambda im: _center_crop_resize(im, self.image_size), images)
        shapes = {im.shape for im in images}
        if len(shapes) > 1:
            raise ValueError(f"images of different shapes {sorted(shapes)[:3]}; set data.image_size")
        return np.stack(images)

    # -- background production -------------------------------------------------------------------

    def _steps(self):
        t = self.start_step
        while self.num_steps is None or t < self.num_steps:
            yield t
            t += 1

    def _put(self, item) -> bool:
        """Queue ``item`` unless stopped first (a closed consumer may never read again)."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            for t in self._steps():
                if not self._put(self.batch(t)):
                    return
            self._put(_END)
        except BaseException as e:  # surfaced in the consumer's thread
            self._put(e)

    def __iter__(self) -> Iterator[Batch]:
        if self._thread is None:
            self._queue = queue.Queue(maxsize=self.prefetch)
            self._thread = threading.Thread(target=self._produce, daemon=True,
                                            name="dp_jax-input")
            self._thread.start()
        return self

    def __next__(self) -> Batch:
        if self._thread is None:
            iter(self)
        item = self._queue.get()
        if item is _END:
            self._queue.put(_END)  # further next() calls stop too
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        """Stop the background thread and release the worker pool."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    def __enter__(self) -> "HostIterator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def eval_batches(source: Any, *, global_batch_size: int, image_size: Optional[int] = None,
                 preprocessing: Optional[dict] = None, process_index: int = 0,
                 process_count: int = 1) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Every example of ``source`` once, in order, as this host's ``(x, y, weight)`` shares.

    The last global batch is padded to full size with weight-0 rows, so one compiled
    evaluation step serves all batches and every host sees the same number of them.
    """
    n = len(source)
    b = global_batch_size // process_count
    for start in range(0, n, global_batch_size):
        lo = start + process_index * b
        idx = [i for i in range(lo, lo + b) if i < n]
        if idx:
            examples = read_examples(source, idx)
            images = [np.asarray(ex["image"]) for ex in examples]
            if image_size:
                images = [_center_crop_resize(im, image_size) for im in images]
            x = np.stack(images).astype(np.float32) / np.float32(255.0)
            if preprocessing is not None:
                x = pre.apply_preprocessing(x, preprocessing)
            y = np.asarray([int(ex["label"]) for ex in examples], np.int32)
        else:
            x = y = None
        pad = b - len(idx)
        if x is None:
            shape = _example_shape(source, image_size)
            x, y = np.zeros((0,) + shape, np.float32), np.zeros((0,), np.int32)
        w = np.concatenate([np.ones(len(idx), np.float32), np.zeros(pad, np.float32)])
        x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], np.float32)])
        y = np.concatenate([y, np.zeros(pad, np.int32)])
        yield x, y, w


def _example_shape(source: Any, image_size: Optional[int]) -> tuple:
    im = np.asarray(source[0]["image"])
    return (image_size, image_size, im.shape[2]) if image_size else im.shape


# ---------------------------------------------------------------------------------------------
# From a config

@dataclasses.dataclass
class StreamingData:
    """Train/test sources of a streamed dataset plus what the model needs to know."""
    name: str
    train: Any
    test: Any
    num_classes: int
    image_shape: tuple
    preprocessing: dict
    augment: str
    image_size: Optional[int]

    @property
    def num_train(self) -> int:
        """Training examples (after the class subset)."""
        return len(self.train)

    def train_iterator(self, *, global_batch_size: int, seed: int, start_step: int,
                       num_steps: int, prefetch: int = 2, num_workers: int = 1) -> HostIterator:
        """This host's training batches for steps ``start_step .. num_steps-1``."""
        return HostIterator(self.train, global_batch_size=global_batch_size, seed=seed,
                            num_steps=num_steps, start_step=start_step, augment=self.augment,
                            image_size=self.image_size, preprocessing=self.preprocessing,
                            prefetch=prefetch, num_workers=num_workers)

    def eval_batches(self, *, global_batch_size: int):
        """This host's shares of the test set, padded (see :func:`eval_batches`)."""
        import jax  # pylint: disable=import-outside-toplevel
        return eval_batches(self.test, global_batch_size=global_batch_size,
                            image_size=self.image_size, preprocessing=self.preprocessing,
                            process_index=jax.process_index(), process_count=jax.process_count())


def fit_stream_preprocessing(source: Any, kind: str, *, image_size: Optional[int],
                             num_samples: int = 2000, seed: int = 0, zca_eps: float = 0.1) -> dict:
    """Fit standardisation (or ZCA) on a seeded random sample of centre-cropped training images."""
    rng = np.random.default_rng([seed, _SAMPLE_STREAM])
    idx = np.sort(rng.choice(len(source), size=min(num_samples, len(source)), replace=False))
    images = [np.asarray(ex["image"]) for ex in read_examples(source, idx)]
    if image_size:
        images = [_center_crop_resize(im, image_size) for im in images]
    x = np.stack(images).astype(np.float32) / np.float32(255.0)
    return pre.fit_preprocessing(kind, x, zca_eps=zca_eps)


def from_config(data: DataSpec, *, seed: int) -> StreamingData:
    """Open ``data.name`` ('tfds:<name>') as a stream, with an optional class subset.

    Fields read: ``name``, ``data_dir``, ``image_size``, ``augment``, ``preprocess``,
    ``zca_eps``, ``classes`` (a tuple of label indices; ``()`` = all),
    ``label_cache`` (directory for the label index; default ``data_dir`` or ~/.cache/dp_jax),
    ``eval_split`` (default 'test', else 'validation'; ImageNet's 'test' has no labels).
    """
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    name = str(data.name)
    if not name.startswith("tfds:"):
        raise ValueError(f"config.data.name={name!r} is invalid with data.pipeline='stream'; "
                         "allowed: tfds:<name>")
    tfds_name, data_dir = name[5:], data.data_dir or None
    builder = tfds.builder(tfds_name, data_dir=data_dir)
    num_classes = int(builder.info.features["label"].num_classes)
    splits = builder.info.splits or {}
    test_split = data.eval_split or ("test" if ("test" in splits or not splits) else "validation")
    train = tfds.data_source(tfds_name, split="train", data_dir=data_dir)
    test = tfds.data_source(tfds_name, split=test_split, data_dir=data_dir)
    classes = tuple(data.classes or ())
    if classes:
        cache_dir = data.label_cache or data_dir or os.path.expanduser("~/.cache/dp_jax")
        stem = os.path.join(cache_dir, "labels_" + tfds_name.replace("/", "_"))
        train = ClassSubset(train, classes, read_labels(train, cache_path=stem + "_train.npy"))
        test = ClassSubset(test, classes, read_labels(test, cache_path=stem + f"_{test_split}.npy"))
        num_classes = len(classes)
    image_size = data.image_size or None
    kind = data.preprocess
    preprocessing = fit_stream_preprocessing(train, kind, image_size=image_size, seed=seed,
                                             zca_eps=float(data.zca_eps))
    return StreamingData(name=name, train=train, test=test, num_classes=num_classes,
                         image_shape=_example_shape(train, image_size), preprocessing=preprocessing,
                         augment=data.augment or "none", image_size=image_size)
