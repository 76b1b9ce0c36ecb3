"""Dataset sources, registered by name: what ``data.name`` may say and who loads it.

A source is either a plain name (``fashion_mnist``) or a scheme followed by an argument
(``tfds:<name>``, ``npz:<path>``). Every check of ``data.name`` asks :func:`resolve`, so a
source added with :func:`register` is accepted everywhere (validation, loading, the run identity)
without editing the package:

    def load_mine(arg, spec):                 # arg: the part after 'mine:' (or None)
        return RawData("mine", x_train, y_train, x_test, y_test, num_classes=10)

    dp_jax.data.register(Source("mine", load_mine, form="mine"))
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Callable, Optional, Sequence

import numpy as np

from dp_jax.data import sources
from dp_jax.data.sources import RawData
from dp_jax.storage import atomic


@dataclasses.dataclass(frozen=True)
class Source:
    """One kind of ``data.name``: a plain name, or ``scheme:<arg>`` when ``takes_arg``."""
    name: str
    load: Callable[[Optional[str], object], RawData]   # (arg, DataSpec) -> RawData
    form: str = ""                # how the name is written, for error messages
    takes_arg: bool = False
    image_size: bool = False      # honours data.image_size (centre crop + resize)
    streams: bool = False         # can be read by the streaming pipeline
    # The files the data is read from (arg, DataSpec) -> paths: their SHA-256 enters the run
    # identity, so a file replaced under the same name is refused like a changed setting.
    files: Optional[Callable[[Optional[str], object], Sequence[str]]] = None

    def describe(self) -> str:
        """The form shown in error messages."""
        return self.form or (f"{self.name}:<arg>" if self.takes_arg else self.name)


SOURCES: dict[str, Source] = {}
_BUILTIN: set = set()


def register(source: Source) -> Source:
    """Add ``source``; a built-in or already registered name is refused (a ValueError)."""
    if not source.name or ":" in source.name or "," in source.name:
        raise ValueError(f"a data source needs a name without ':' or ',', got {source.name!r}")
    if source.name in SOURCES:
        raise ValueError(f"data source {source.name!r} is already registered"
                         + (" (built in)" if source.name in _BUILTIN else ""))
    SOURCES[source.name] = source
    return source


def forms() -> str:
    """Every accepted form of ``data.name``, as error messages list them."""
    return " | ".join(s.describe() for s in SOURCES.values())


def resolve(name) -> tuple[Source, Optional[str]]:
    """``(source, arg)`` of a ``data.name``; a ValueError names the allowed forms."""
    if not isinstance(name, str):
        raise ValueError(f"config.data.name={name!r} is invalid; allowed: {forms()}")
    scheme, colon, arg = name.partition(":")
    source = SOURCES.get(scheme)
    if source is None or bool(colon) != source.takes_arg or (colon and not arg):
        raise ValueError(f"config.data.name={name!r} is invalid; allowed: {forms()}")
    return source, (arg if colon else None)


def load(spec) -> RawData:
    """The raw splits of ``spec.name`` (a :class:`~dp_jax.data.spec.DataSpec`)."""
    source, arg = resolve(spec.name)
    if spec.image_size and not source.image_size:
        raise ValueError(f"config.data.image_size is invalid with data.name={spec.name!r}; "
                         f"allowed: unset, or a source that resizes ("
                         + ", ".join(s.describe() for s in SOURCES.values() if s.image_size) + ")")
    return source.load(arg, spec)


def content_fingerprint(spec) -> Optional[str]:
    """SHA-256 of the files ``spec.name`` reads (:attr:`Source.files`), or None for a source
    that names no files (a TFDS dataset, in-memory arrays identified by their own hash)."""
    source, arg = resolve(spec.name)
    paths = list(source.files(arg, spec)) if source.files is not None else []
    if not paths:
        return None
    if len(paths) == 1:
        return file_sha256(paths[0])
    return hashlib.sha256("".join(f"{file_sha256(p)}\n" for p in paths).encode()).hexdigest()


# ---- file fingerprints, cached ---------------------------------------------------------------
#
# A data file is hashed before any workdir is touched (its hash is part of the identity the
# workdir is checked against) and is usually shared by many workdirs, so the cache is the
# user's, not a workdir's: $DP_JAX_FINGERPRINT_CACHE (a file path; "off" disables it), else
# ~/.cache/dp_jax/fingerprints.json. An entry is reused only while the file's size, mtime_ns,
# ctime_ns and inode are unchanged: mtime alone can be set back (touch -r, cp -p) but ctime
# cannot, and replacing the file (mv, an atomic write) changes the inode. A missing, corrupt
# or unwritable cache only costs a re-hash.

CACHE_ENV = "DP_JAX_FINGERPRINT_CACHE"
_CACHE_ENTRIES = 256  # the most recent files kept


def fingerprint_cache_path() -> Optional[str]:
    """Where file fingerprints are cached (None when $DP_JAX_FINGERPRINT_CACHE=off)."""
    path = os.environ.get(CACHE_ENV, "")
    if path.lower() == "off":
        return None
    return path or os.path.join(os.path.expanduser("~"), ".cache", "dp_jax", "fingerprints.json")


def _stamp(path: str) -> list:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _read_cache(path: Optional[str]) -> dict:
    try:
        with open(path) as f:
            cache = json.load(f)
    except (OSError, TypeError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file's bytes, from the fingerprint cache while the file is unchanged."""
    key, cache_path = os.path.realpath(path), fingerprint_cache_path()
    stamp = _stamp(key)
    cache = _read_cache(cache_path)
    hit = cache.get(key)
    if isinstance(hit, dict) and hit.get("stamp") == stamp and isinstance(hit.get("sha256"), str):
        return hit["sha256"]
    h = hashlib.sha256()
    with open(key, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    if cache_path is not None and _stamp(key) == stamp:  # not written to while it was read
        cache.pop(key, None)
        cache[key] = {"stamp": stamp, "sha256": digest}
        kept = dict(list(cache.items())[-_CACHE_ENTRIES:])
        try:
            atomic.atomic_write_bytes(cache_path, json.dumps(kept).encode())
        except (OSError, RuntimeError):  # a read-only home or a full disk: hash again next time
            pass
    return digest


# In-memory arrays handed to the library (``dp_jax.run(..., data=...)``), by fingerprint.
_ARRAYS: dict[str, RawData] = {}


def fingerprint(*arrays: np.ndarray) -> str:
    """SHA-256 of the arrays' dtypes, shapes and bytes (what identifies user data in a run)."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def put_arrays(x_train, y_train, x_test, y_test) -> str:
    """Hold user arrays in memory and return the ``data.name`` that reads them
    (``arrays:<sha256>``). Images are (N, H, W, C) or (N, H, W); labels integers in
    [0, classes), classes = the largest training label + 1. Shape errors are ValueErrors
    naming the array, raised here, before any work."""
    xs, ys = {"x_train": np.asarray(x_train), "x_test": np.asarray(x_test)}, \
        {"y_train": np.asarray(y_train), "y_test": np.asarray(y_test)}
    for k, x in xs.items():
        if x.ndim == 3:
            xs[k] = x = x[..., None]
        if x.ndim != 4:
            raise ValueError(f"data: {k} has shape {x.shape}; allowed: (N, H, W, C) or (N, H, W)")
    for split in ("train", "test"):
        x, y = xs[f"x_{split}"], ys[f"y_{split}"]
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"data: y_{split} must be 1-D integer labels, got shape {y.shape} "
                             f"dtype {y.dtype}")
        if len(y) != len(x):
            raise ValueError(f"data: x_{split} has {len(x)} images but y_{split} {len(y)} labels")
    if min(ys["y_train"].min(initial=0), ys["y_test"].min(initial=0)) < 0:
        raise ValueError("data: labels must lie in [0, classes); found a negative label")
    fp = fingerprint(xs["x_train"], ys["y_train"], xs["x_test"], ys["y_test"])
    _ARRAYS[fp] = RawData(f"arrays:{fp[:12]}", xs["x_train"], ys["y_train"], xs["x_test"],
                          ys["y_test"], num_classes=int(ys["y_train"].max(initial=-1)) + 1)
    return f"arrays:{fp}"


def _load_arrays(arg, spec) -> RawData:
    if arg not in _ARRAYS:
        raise ValueError(f"config.data.name=arrays:{arg[:12]}... names arrays held by the Python "
                         "process that ran it; pass the same arrays again with "
                         "dp_jax.run(config, workdir, data=(x_train, y_train, x_test, y_test))")
    return _ARRAYS[arg]


for _s in (
        Source("fashion_mnist", lambda arg, spec: sources.load_fashion_mnist(spec.data_dir or None)),
        Source("tfds", lambda arg, spec: sources.load_tfds(arg, data_dir=spec.data_dir or None,
                                                           image_size=spec.image_size or None),
               form="tfds:<name>", takes_arg=True, image_size=True, streams=True),
        Source("npz", lambda arg, spec: sources.load_npz(arg), form="npz:<path>",
               takes_arg=True, files=lambda arg, spec: [arg]),
        Source("arrays", _load_arrays, form="arrays:<sha256> (dp_jax.run(..., data=...))",
               takes_arg=True)):
    register(_s)
    _BUILTIN.add(_s.name)
