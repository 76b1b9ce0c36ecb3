"""Read tensors from ``torch.save`` files without torch, without running their code, bounded.

A torch >= 1.6 ``.pt`` file is a zip: ``<name>/data.pkl`` (a pickle of the saved object),
``<name>/data/<key>`` (storages' raw bytes), ``<name>/byteorder``. The standard unpickler calls
whatever globals ``data.pkl`` names (``os.system`` included); :func:`load` reads it with
``safe_unpickler.SafeUnpickler`` (a checked opcode table), allowing only the globals in ``ALLOWED``
(code defined here). Storage records come from the archive; tensors are rebuilt from offset, size
and strides >= 0, bounds-checked. Legacy files (a bare pickle stream) are refused unread.

Every resource a file can ask for is booked against :class:`Limits` *before* it is spent: bytes
inflated from the zip; the pickle's opcodes, memo references and nesting; the result's objects
counted with multiplicity (shared references cannot hide an exponential structure); the bytes one
tensor view materialises and those of all storages and tensors of the file. A refusal is a
one-line ``LimitError`` (a ``ValueError``) naming the file and the limit.

torch 2.13 pickles tensors (protocols 2, 4, 5) with ``torch._utils._rebuild_tensor_v2``,
``torch.<Dtype>Storage``, ``collections.OrderedDict`` (empty hooks) and, for ``nn.Parameter``,
``torch._utils._rebuild_parameter``. Results are numpy arrays (bfloat16 widened to float32)
inside plain lists, tuples and dicts.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import pickle
import re
import zipfile

import numpy as np

from dp_jax.distill.safe_unpickler import (DICTS, LimitError, SafeUnpickler, check_plain,
                                           short_repr)

# Storage class name -> numpy dtype of its elements ('bfloat16' is read as uint16, then widened).
STORAGE_DTYPES = {
    "FloatStorage": "f4", "DoubleStorage": "f8", "HalfStorage": "f2", "BFloat16Storage": "u2",
    "LongStorage": "i8", "IntStorage": "i4", "ShortStorage": "i2", "CharStorage": "i1",
    "ByteStorage": "u1", "BoolStorage": "?",
}
# The limits (generous for published distilled sets, which are at most a few hundred MB). data.pkl
# holds ~100 bytes and ~30 opcodes per tensor, never tensor data: 64 MiB / 2**20 opcodes is
# tens of thousands of tensors.
MAX_PICKLE_BYTES = 64 << 20
MAX_OPCODES = 1 << 20
# torch.save memoises each repeated string/global, ~6 references per tensor after the first.
MAX_MEMO_REFS = 1 << 18
# Open MARKs and container depth of the result; genuine files need 3-4 (e.g. dict > list > tensor).
MAX_NESTING = 32
# Containers, scalars and arrays of the result counted with multiplicity (a tree walk of it, e.g.
# its repr, costs this much): 2**20 is far above a list of per-class tensors.
MAX_OBJECTS = 1 << 20
# Bytes one tensor materialises (numel x itemsize of the view): 1 GiB is twice Tiny-ImageNet at 50
# images per class (float32). A stride-0 view of a 4-byte storage can otherwise ask for terabytes.
MAX_TENSOR_BYTES = 1 << 30
# All storages read plus all tensors materialised by one load (the memory it may take).
MAX_TOTAL_BYTES = 4 << 30
_MAX_INT = 1 << 62  # offsets, sizes, strides: keeps products small and strides inside intp
_PICKLE_MAGIC = 0x1950A86A20F9469CFC6C  # what legacy torch.save writes first


@dataclasses.dataclass(frozen=True)
class Limits:
    """The bounds one :func:`load` enforces; see the ``MAX_*`` constants for what each means."""
    pickle_bytes: int
    opcodes: int
    memo_refs: int
    nesting: int
    objects: int
    tensor_bytes: int
    total_bytes: int

    @classmethod
    def default(cls) -> "Limits":
        """The module constants as they are now (so a test can lower one by monkeypatching)."""
        return cls(MAX_PICKLE_BYTES, MAX_OPCODES, MAX_MEMO_REFS, MAX_NESTING, MAX_OBJECTS,
                   MAX_TENSOR_BYTES, MAX_TOTAL_BYTES)


class _StorageType:
    """Stands for ``torch.<X>Storage`` in a storage record; not callable."""

    def __init__(self, name: str):
        self.name, self.dtype = name, np.dtype(STORAGE_DTYPES[name])

    def __repr__(self):
        return f"torch.{self.name}"


_STORAGE_TYPES = {name: _StorageType(name) for name in STORAGE_DTYPES}
ALLOWED = frozenset([("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
                     ("collections", "OrderedDict")] + [("torch", n) for n in STORAGE_DTYPES])


@dataclasses.dataclass
class _Storage:
    """A storage's elements as a read-only 1-D numpy array."""
    array: np.ndarray
    bfloat16: bool


def _int(x, what: str) -> int:
    if type(x) is not int or not 0 <= x < _MAX_INT:
        raise pickle.UnpicklingError(f"{what} must be an integer in [0, 2**62), got "
                                     f"{short_repr(x)}")
    return x


def _ordered_dict(*args):
    """``collections.OrderedDict`` as torch calls it (no arguments; items come by SETITEMS)."""
    if args:
        raise pickle.UnpicklingError(f"OrderedDict called with arguments {short_repr(args)}")
    return collections.OrderedDict()


def _rebuild_parameter(data, requires_grad, hooks):
    """``torch._utils._rebuild_parameter``: a Parameter is read as its data."""
    if not isinstance(data, np.ndarray) or type(hooks) not in DICTS or hooks:
        raise pickle.UnpicklingError("malformed parameter record")
    return data


def _view_shape(storage, offset, size, stride, requires_grad, hooks, metadata):
    """The checked ``(offset, size, stride)`` of a ``_rebuild_tensor_v2`` record."""
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError(f"tensor storage must be a storage record, got "
                                     f"{short_repr(storage)}")
    if not (type(size) is tuple and type(stride) is tuple and len(size) == len(stride)):
        raise pickle.UnpicklingError(f"tensor size {short_repr(size)} and stride "
                                     f"{short_repr(stride)} must be tuples of equal length")
    offset = _int(offset, "storage offset")
    size = tuple(_int(s, "tensor size") for s in size)
    stride = tuple(_int(s, "tensor stride (negative strides are not supported)") for s in stride)
    if type(requires_grad) is not bool or type(hooks) not in DICTS or hooks:
        raise pickle.UnpicklingError("tensor with backward hooks or a bad requires_grad flag")
    if metadata is not None and not (type(metadata) in DICTS and not metadata):
        raise pickle.UnpicklingError(f"tensor metadata {short_repr(metadata)} is not supported")
    # A dimension of size 1 never steps: its stride is free, so keep it from overflowing intp.
    return offset, size, tuple(0 if n == 1 else s for n, s in zip(size, stride))


def _materialise(storage: _Storage, offset: int, size: tuple, stride: tuple) -> np.ndarray:
    """The view as a new native-order array (one allocation: the size that was charged)."""
    arr = storage.array
    out = np.empty(size, np.uint32 if storage.bfloat16 else arr.dtype.newbyteorder("="))
    if out.size:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= arr.size:  # with strides >= 0 this bounds every element read
            raise pickle.UnpicklingError(f"tensor view (offset {offset}, size {size}, stride "
                                         f"{stride}) runs past its storage of {arr.size}")
        view = np.lib.stride_tricks.as_strided(
            arr[offset:], shape=size, strides=[s * arr.itemsize for s in stride],
            writeable=False)
        np.copyto(out, view, casting="safe")  # also byte-swaps and widens bfloat16's uint16
    if storage.bfloat16:  # bfloat16 is the top half of a float32
        out <<= 16
        out = out.view(np.float32)
    return out


def _read_entry(archive: zipfile.ZipFile, name: str, limit: int, limit_name: str,
                path: str) -> bytes:
    """An archive member, refused when its header or its inflated bytes exceed ``limit``."""
    info = archive.getinfo(name)
    if info.file_size > limit:
        raise LimitError(f"{path}: refused: {name} declares {info.file_size} bytes, over "
                         f"{limit_name} = {limit}")
    with archive.open(info) as f:
        data = f.read(limit + 1)  # never trust the header: inflate at most one byte too many
    if len(data) > limit:
        raise LimitError(f"{path}: refused: {name} inflates past {limit_name} = {limit} bytes "
                         "(its header lies about its size)")
    return data


class _TensorUnpickler(SafeUnpickler):
    """The checked unpickler of ``data.pkl``: torch's globals, storages from the archive."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, path: str,
                 limits: Limits):
        # Stored once, so REDUCE can check the callable by identity.
        functions = {("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor,
                     ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
                     ("collections", "OrderedDict"): _ordered_dict}
        super().__init__(data, path, limits, functions,
                         {("torch", n): t for n, t in _STORAGE_TYPES.items()})
        self._zip, self._prefix = archive, prefix
        self._storages: dict = {}
        self._left = limits.total_bytes
        order = "little"
        if f"{prefix}/byteorder" in archive.namelist():
            raw = _read_entry(archive, f"{prefix}/byteorder", 16, "16 bytes", path)
            order = raw.decode("ascii", "replace").strip()
        if order not in ("little", "big"):
            raise ValueError(f"{path}: unknown byteorder {short_repr(order)} in the torch "
                             "archive")
        self._order = "<" if order == "little" else ">"

    def _charge(self, nbytes: int, what: str, one_limit: int | None = None) -> None:
        """Books ``nbytes`` against the file's budget before they are allocated."""
        if one_limit is not None and nbytes > one_limit:
            raise self._limit(f"{what} would take {nbytes} bytes", "one tensor view",
                              "MAX_TENSOR_BYTES", one_limit)
        if nbytes > self._left:
            raise self._limit(f"{what} would take {nbytes} bytes", "all storages and tensors "
                              "of the file together", "MAX_TOTAL_BYTES", self._limits.total_bytes)
        self._left -= nbytes

    def persistent_load(self, pid):
        if not (type(pid) is tuple and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and type(pid[2]) is str
                and re.fullmatch(r"[0-9A-Za-z_]{1,64}", pid[2]) and type(pid[3]) is str):
            raise pickle.UnpicklingError(f"unsupported persistent record {short_repr(pid)}")
        stype, key, numel = pid[1], pid[2], _int(pid[4], "storage size")
        if (key, stype.name) not in self._storages:
            name, need = f"{self._prefix}/data/{key}", numel * stype.dtype.itemsize
            try:
                info = self._zip.getinfo(name)
            except KeyError:
                raise pickle.UnpicklingError(f"storage {key!r} is not in the archive") from None
            if info.file_size < need:
                raise pickle.UnpicklingError(f"storage {key!r} holds {info.file_size} bytes, "
                                             f"{need} needed for {numel} {stype.name} elements")
            self._charge(need, f"storage {key!r} of {numel} {stype.name} elements")
            with self._zip.open(info) as f:
                raw = f.read(need)  # at most what was charged, whatever the entry inflates to
            if len(raw) != need:
                raise pickle.UnpicklingError(f"storage {key!r} inflates to {len(raw)} bytes, "
                                             f"fewer than the {need} its header promises")
            arr = np.frombuffer(raw, stype.dtype.newbyteorder(self._order), count=numel)
            self._storages[(key, stype.name)] = _Storage(arr, stype.name == "BFloat16Storage")
        return self._storages[(key, stype.name)]

    def _rebuild_tensor(self, storage, offset, size, stride, requires_grad, hooks,
                        metadata=None):
        """``torch._utils._rebuild_tensor_v2`` as a numpy copy of the (strided) view."""
        offset, size, stride = _view_shape(storage, offset, size, stride, requires_grad, hooks,
                                           metadata)
        itemsize = 4 if storage.bfloat16 else storage.array.itemsize
        self._charge(math.prod(size) * itemsize, f"a tensor of size {size}, stride {stride}",
                     self._limits.tensor_bytes)
        return _materialise(storage, offset, size, stride)


def _archive_prefix(archive: zipfile.ZipFile, path: str) -> str:
    """The one top-level directory holding ``data.pkl`` (torch names it after the file)."""
    names = archive.namelist()
    tops = {n.split("/", 1)[0] for n in names}
    if len(tops) != 1 or f"{next(iter(tops))}/data.pkl" not in names:
        raise ValueError(f"{path}: not a torch.save file (a zip, but no <dir>/data.pkl among "
                         f"{short_repr(sorted(names)[:5])})")
    return next(iter(tops))


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


def _refuse_non_zip(path: str) -> None:
    """ValueError naming ``path`` unless it is a zip archive (legacy torch files are pickles)."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e})") from e
    if zipfile.is_zipfile(path):
        return
    if head[:1] == b"\x80":  # a pickle stream: legacy torch format, or any pickle at all
        legacy = head[2:3] == b"\x8a" and int.from_bytes(head[4:14], "little") == _PICKLE_MAGIC
        raise ValueError(
            f"{path}: " + ("a legacy torch.save file (torch < 1.6 or "
                           "_use_new_zipfile_serialization=False)" if legacy else
                           "a bare pickle, not a torch.save zip archive")
            + "; it is refused unread (re-save the tensors with torch >= 1.6)")
    raise ValueError(f"{path}: not a torch.save file (not a zip archive)")


def load(path: str, limits: Limits | None = None):
    """The object saved in the torch file ``path``, tensors as numpy arrays (never runs code).

    ValueError naming the file if it is not a torch >= 1.6 archive, is malformed, names a
    forbidden global or opcode (``safe_unpickler.UnsafePickleError``) or exceeds ``limits``
    (default :meth:`Limits.default`; ``safe_unpickler.LimitError``).
    """
    limits = limits or Limits.default()
    _refuse_non_zip(path)
    try:
        with zipfile.ZipFile(path) as archive:
            prefix = _archive_prefix(archive, path)
            data = _read_entry(archive, f"{prefix}/data.pkl", limits.pickle_bytes,
                               "MAX_PICKLE_BYTES", path)
            obj = _TensorUnpickler(data, archive, prefix, path, limits).load()
        check_plain(obj, path, limits)
    except ValueError as e:
        if str(e).startswith(str(path)):
            raise
        raise ValueError(f"{path}: malformed torch file ({_one_line(e)})") from e
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, TypeError, AttributeError,
            IndexError, KeyError, OSError, RecursionError, OverflowError) as e:
        raise ValueError(f"{path}: malformed torch file ({type(e).__name__}: "
                         f"{_one_line(e)})") from e
    return obj


def load_arrays(path: str, *fields: str, limits: Limits | None = None) -> list:
    """The arrays ``fields`` of a torch file: one tensor, or a saved list/tuple of that many."""
    obj = load(path, limits)
    items = [obj] if len(fields) == 1 else obj
    if not (isinstance(items, (list, tuple)) and len(items) == len(fields)
            and all(isinstance(x, np.ndarray) for x in items)):
        want = "a tensor" if len(fields) == 1 else f"a list of {len(fields)} tensors"
        raise ValueError(f"{path}: expected {' and '.join(map(repr, fields))} as {want}, got a "
                         f"{type(obj).__name__}")
    return list(items)
