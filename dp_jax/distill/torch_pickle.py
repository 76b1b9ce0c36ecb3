"""Read tensors from ``torch.save`` files without torch and without running the file's code.

A ``.pt`` file written by torch >= 1.6 is a zip archive ``<name>/data.pkl`` (a pickle of the saved
object) plus ``<name>/data/<key>`` (each storage's raw bytes; ``<name>/byteorder`` says the byte
order, little if absent). Unpickling ``data.pkl`` with the standard unpickler imports and calls
whatever globals the pickle names -- ``os.system`` included -- so ``torch.load`` of an untrusted
file is arbitrary code execution unless ``weights_only=True``.

This module gives ``weights_only`` semantics without the dependency: :func:`load` unpickles with
a :class:`pickle.Unpickler` whose ``find_class`` resolves only the globals a tensor save needs
(see ``ALLOWED``), each mapped to a function defined here that builds a numpy array; every other
global raises :class:`UnsafePickleError` *when it is named*, i.e. before anything could call it.
Storage records ``('storage', <type>, key, location, numel)`` are served by ``persistent_load``
from the archive's raw bytes, and tensors are rebuilt with the recorded offset, size and stride
(contiguous and strided views with non-negative strides, bounds-checked). Legacy files (torch <
1.6 or ``_use_new_zipfile_serialization=False``: a bare pickle stream) are refused unread. Torch
is never imported, so converting a distilled set does not need it installed at all.

What a tensor save pickles (checked against files written by torch 2.13): ``torch._utils.
_rebuild_tensor_v2``, ``torch.<Dtype>Storage``, ``collections.OrderedDict`` (the empty backward
hooks) and, for ``nn.Parameter``, ``torch._utils._rebuild_parameter``. Results are numpy arrays
(bfloat16 is widened to float32) inside plain lists, tuples and dicts.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import re
import zipfile

import numpy as np

# Storage class name -> numpy dtype of its elements ('bfloat16' is read as uint16, then widened).
STORAGE_DTYPES = {
    "FloatStorage": "f4", "DoubleStorage": "f8", "HalfStorage": "f2", "BFloat16Storage": "u2",
    "LongStorage": "i8", "IntStorage": "i4", "ShortStorage": "i2", "CharStorage": "i1",
    "ByteStorage": "u1", "BoolStorage": "?",
}
# Far above any distilled set (1 GiB of float32); stops a 20-byte pickle asking for terabytes.
MAX_ELEMENTS = 1 << 28
_PICKLE_MAGIC = 0x1950A86A20F9469CFC6C  # what legacy torch.save writes first


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """The pickle names a global outside the allow-list (never imported, never called)."""


class _StorageType:
    """Stands for ``torch.<X>Storage`` in a storage record; not callable, not buildable."""

    def __init__(self, name: str):
        self.name, self.dtype = name, np.dtype(STORAGE_DTYPES[name])

    def __setstate__(self, state):
        raise pickle.UnpicklingError("a storage type cannot be given state")


class _Storage:
    """A storage's elements as a read-only 1-D numpy array."""
    __slots__ = ("array", "bfloat16")

    def __init__(self, array: np.ndarray, bfloat16: bool):
        self.array, self.bfloat16 = array, bfloat16

    def __setstate__(self, state):
        raise pickle.UnpicklingError("a storage cannot be given state")


def _int(x, what: str, lo: int = 0) -> int:
    if type(x) is not int or x < lo:
        raise pickle.UnpicklingError(f"{what} must be an integer >= {lo}, got {x!r}")
    return x


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks, metadata=None):
    """``torch._utils._rebuild_tensor_v2`` as a numpy copy of the (strided) view."""
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError(f"tensor storage must be a storage record, got {storage!r}")
    if not (isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)):
        raise pickle.UnpicklingError(f"tensor size {size!r} and stride {stride!r} must be "
                                     "tuples of equal length")
    offset = _int(offset, "storage offset")
    size = tuple(_int(s, "tensor size") for s in size)
    stride = tuple(_int(s, "tensor stride (negative strides are not supported)") for s in stride)
    if type(requires_grad) is not bool or not isinstance(hooks, dict) or hooks:
        raise pickle.UnpicklingError("tensor with backward hooks or a bad requires_grad flag")
    if metadata not in (None, {}):
        raise pickle.UnpicklingError(f"tensor metadata {metadata!r} is not supported")
    arr = storage.array
    numel = math.prod(size)
    if numel > MAX_ELEMENTS:
        raise pickle.UnpicklingError(f"tensor of {numel} elements exceeds {MAX_ELEMENTS}")
    if numel == 0:
        out = np.zeros(size, arr.dtype)
    else:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= arr.size:  # with strides >= 0 this bounds every element read
            raise pickle.UnpicklingError(f"tensor view (offset {offset}, size {size}, stride "
                                         f"{stride}) runs past its storage of {arr.size}")
        out = np.lib.stride_tricks.as_strided(
            arr[offset:], shape=size, strides=[s * arr.itemsize for s in stride],
            writeable=False).copy()
    if storage.bfloat16:  # bfloat16 is the top half of a float32
        out = (out.astype(np.uint32) << 16).view(np.float32)
    return out.astype(out.dtype.newbyteorder("="), copy=False)


def _rebuild_parameter(data, requires_grad, hooks):
    """``torch._utils._rebuild_parameter``: a Parameter is read as its data."""
    if not isinstance(data, np.ndarray) or not isinstance(hooks, dict) or hooks:
        raise pickle.UnpicklingError("malformed parameter record")
    return data


ALLOWED = {("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
           ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
           ("collections", "OrderedDict"): collections.OrderedDict}
ALLOWED.update({("torch", name): _StorageType(name) for name in STORAGE_DTYPES})


class _TensorUnpickler(pickle.Unpickler):
    """Resolves only ``ALLOWED`` globals; storages come from the zip archive."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, path: str):
        super().__init__(io.BytesIO(data))
        self._zip, self._prefix, self._path = archive, prefix, path
        self._storages: dict = {}
        order = "little"
        if f"{prefix}/byteorder" in archive.namelist():
            order = archive.read(f"{prefix}/byteorder").decode("ascii", "replace").strip()
        if order not in ("little", "big"):
            raise ValueError(f"{path}: unknown byteorder {order!r} in the torch archive")
        self._order = "<" if order == "little" else ">"

    def find_class(self, module, name):
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self._path}: refusing to load: the pickle names the global {module}.{name}, "
                "which a tensor file does not need (allowed: "
                + ", ".join(sorted(f"{m}.{n}" for m, n in ALLOWED)) + ")") from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)
                and re.fullmatch(r"[0-9A-Za-z_]+", pid[2]) and isinstance(pid[3], str)):
            raise pickle.UnpicklingError(f"unsupported persistent record {pid!r}")
        stype, key, numel = pid[1], pid[2], _int(pid[4], "storage size")
        if (key, stype.name) not in self._storages:
            if numel > MAX_ELEMENTS:
                raise pickle.UnpicklingError(f"storage of {numel} elements exceeds {MAX_ELEMENTS}")
            name = f"{self._prefix}/data/{key}"
            need = numel * stype.dtype.itemsize
            try:
                info = self._zip.getinfo(name)
            except KeyError:
                raise pickle.UnpicklingError(f"storage {key!r} is not in the archive") from None
            if info.file_size < need:
                raise pickle.UnpicklingError(f"storage {key!r} holds {info.file_size} bytes, "
                                             f"{need} needed for {numel} {stype.name} elements")
            with self._zip.open(info) as f:
                raw = f.read(need)
            arr = np.frombuffer(raw, stype.dtype.newbyteorder(self._order), count=numel)
            self._storages[(key, stype.name)] = _Storage(arr, stype.name == "BFloat16Storage")
        return self._storages[(key, stype.name)]


def _check_plain(obj, path: str, depth: int = 0):
    """The result may hold only arrays and plain containers/scalars (defence in depth)."""
    if depth > 50:
        raise ValueError(f"{path}: the saved object is nested too deeply")
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biuf":
            raise ValueError(f"{path}: unexpected array dtype {obj.dtype}")
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _check_plain(v, path, depth + 1)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _check_plain(k, path, depth + 1)
            _check_plain(v, path, depth + 1)
    elif obj is not None and type(obj) not in (bool, int, float, str):
        raise ValueError(f"{path}: unexpected object of type {type(obj).__name__}")


def _archive_prefix(archive: zipfile.ZipFile, path: str) -> str:
    """The one top-level directory holding ``data.pkl`` (torch names it after the file)."""
    names = archive.namelist()
    tops = {n.split("/", 1)[0] for n in names}
    if len(tops) != 1 or f"{next(iter(tops))}/data.pkl" not in names:
        raise ValueError(f"{path}: not a torch.save file (a zip, but no <dir>/data.pkl among "
                         f"{sorted(names)[:5]})")
    return next(iter(tops))


def load(path: str):
    """The object saved in the torch file ``path``, tensors as numpy arrays (never runs code).

    ValueError naming the file if it is not a torch >= 1.6 archive, is malformed, or its pickle
    names a forbidden global (:class:`UnsafePickleError`).
    """
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e})") from e
    if not zipfile.is_zipfile(path):
        if head[:1] == b"\x80":  # a pickle stream: legacy torch format, or any pickle at all
            legacy = head[2:3] == b"\x8a" and int.from_bytes(head[4:14], "little") == _PICKLE_MAGIC
            raise ValueError(
                f"{path}: " + ("a legacy torch.save file (torch < 1.6 or "
                               "_use_new_zipfile_serialization=False)" if legacy else
                               "a bare pickle, not a torch.save zip archive")
                + "; it is refused unread (re-save the tensors with torch >= 1.6)")
        raise ValueError(f"{path}: not a torch.save file (not a zip archive)")
    try:
        with zipfile.ZipFile(path) as archive:
            prefix = _archive_prefix(archive, path)
            data = archive.read(f"{prefix}/data.pkl")
            obj = _TensorUnpickler(data, archive, prefix, path).load()
    except UnsafePickleError:
        raise
    except ValueError as e:
        if str(e).startswith(str(path)):
            raise
        raise ValueError(f"{path}: malformed torch file ({e})") from e
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, TypeError, AttributeError,
            IndexError, KeyError, OSError, RecursionError) as e:
        raise ValueError(f"{path}: malformed torch file ({type(e).__name__}: {e})") from e
    _check_plain(obj, path)
    return obj


def load_arrays(path: str, *fields: str) -> list:
    """The arrays ``fields`` of a torch file: one tensor, or a saved list/tuple of that many."""
    obj = load(path)
    items = [obj] if len(fields) == 1 else obj
    if not (isinstance(items, (list, tuple)) and len(items) == len(fields)
            and all(isinstance(x, np.ndarray) for x in items)):
        want = "a tensor" if len(fields) == 1 else f"a list of {len(fields)} tensors"
        raise ValueError(f"{path}: expected {' and '.join(map(repr, fields))} as {want}, got a "
                         f"{type(obj).__name__}")
    return list(items)
