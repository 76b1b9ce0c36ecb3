"""Read tensors from ``torch.save`` files without torch, without running their code, bounded.

A torch >= 1.6 ``.pt`` file is a zip: ``<name>/data.pkl`` (a pickle of the saved object),
``<name>/data/<key>`` (storages' raw bytes), ``<name>/byteorder``. The standard unpickler calls
whatever globals ``data.pkl`` names (``os.system`` included). :func:`load` runs the pure-Python
:class:`pickle._Unpickler` with its own opcode table: only plain-data, memo, global and
persistent-id opcodes exist, each checked first. ``find_class`` resolves only ``ALLOWED`` (code
defined here; any other global raises :class:`UnsafePickleError` when named), REDUCE calls only
those, dict keys must be scalars (hashing a nested tuple is exponential), BUILD sets nothing
(torch emits it only for a state dict's ``OrderedDict._metadata``, dropped). Storage records come
from the archive; tensors are rebuilt from offset, size and strides >= 0, bounds-checked. Legacy
files (a bare pickle stream) are refused unread.

Every resource a file can ask for is booked against :class:`Limits` *before* it is spent: bytes
inflated from the zip; the pickle's opcodes, memo references and nesting; the result's objects
counted with multiplicity (shared references cannot hide an exponential structure); the bytes one
tensor view materialises and those of all storages and tensors of the file. A refusal is a
one-line :class:`LimitError` (a ``ValueError``) naming the file and the limit.

torch 2.13 pickles tensors (protocols 2, 4, 5) with ``torch._utils._rebuild_tensor_v2``,
``torch.<Dtype>Storage``, ``collections.OrderedDict`` (empty hooks) and, for ``nn.Parameter``,
``torch._utils._rebuild_parameter``. Results are numpy arrays (bfloat16 widened to float32)
inside plain lists, tuples and dicts.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import math
import pickle
import pickletools
import re
import reprlib
import zipfile

import numpy as np

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
_SCALARS = (str, int, float, bool, type(None))
_DICTS = (dict, collections.OrderedDict)


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


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """The pickle names a global or opcode outside the allow-list (never imported or run)."""


class LimitError(ValueError):
    """The file asks for more than a limit allows (detected before the resource is spent)."""


class _BoundedRepr(reprlib.Repr):
    """reprlib's depth and width bounds, plus arrays and ints, whose own reprs are unbounded
    (numpy prints every element of a (2,)*30 array; a 10**6-digit int is refused)."""

    def repr_ndarray(self, x, level):
        return f"<{x.dtype} array of shape {x.shape}>"

    def repr_int(self, x, level):
        return repr(x) if x.bit_length() <= 64 else f"<an integer of {x.bit_length()} bits>"


_REPR = _BoundedRepr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 60, 60


def _short(x) -> str:
    """A bounded one-line repr of attacker-controlled data (a full repr can be exponential)."""
    return _REPR.repr(x).replace("\n", " ")


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
        raise pickle.UnpicklingError(f"{what} must be an integer in [0, 2**62), got {_short(x)}")
    return x


def _ordered_dict(*args):
    """``collections.OrderedDict`` as torch calls it (no arguments; items come by SETITEMS)."""
    if args:
        raise pickle.UnpicklingError(f"OrderedDict called with arguments {_short(args)}")
    return collections.OrderedDict()


def _rebuild_parameter(data, requires_grad, hooks):
    """``torch._utils._rebuild_parameter``: a Parameter is read as its data."""
    if not isinstance(data, np.ndarray) or type(hooks) not in _DICTS or hooks:
        raise pickle.UnpicklingError("malformed parameter record")
    return data


def _view_shape(storage, offset, size, stride, requires_grad, hooks, metadata):
    """The checked ``(offset, size, stride)`` of a ``_rebuild_tensor_v2`` record."""
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError(f"tensor storage must be a storage record, got "
                                     f"{_short(storage)}")
    if not (type(size) is tuple and type(stride) is tuple and len(size) == len(stride)):
        raise pickle.UnpicklingError(f"tensor size {_short(size)} and stride {_short(stride)} "
                                     "must be tuples of equal length")
    offset = _int(offset, "storage offset")
    size = tuple(_int(s, "tensor size") for s in size)
    stride = tuple(_int(s, "tensor stride (negative strides are not supported)") for s in stride)
    if type(requires_grad) is not bool or type(hooks) not in _DICTS or hooks:
        raise pickle.UnpicklingError("tensor with backward hooks or a bad requires_grad flag")
    if metadata is not None and not (type(metadata) in _DICTS and not metadata):
        raise pickle.UnpicklingError(f"tensor metadata {_short(metadata)} is not supported")
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


# The opcodes a plain-data pickle with globals and persistent ids needs; everything else (INST,
# OBJ, NEWOBJ*, EXT*, PERSID, DUP, bytes, sets, buffers, ...) is refused when it is read.
_PLAIN_OPS = frozenset(
    "PROTO FRAME STOP MARK POP POP_MARK INT BININT BININT1 BININT2 LONG LONG1 LONG4 FLOAT "
    "BINFLOAT STRING BINSTRING SHORT_BINSTRING UNICODE BINUNICODE SHORT_BINUNICODE BINUNICODE8 "
    "NONE NEWTRUE NEWFALSE EMPTY_TUPLE TUPLE TUPLE1 TUPLE2 TUPLE3 EMPTY_LIST LIST APPEND APPENDS "
    "EMPTY_DICT DICT SETITEM SETITEMS GLOBAL STACK_GLOBAL REDUCE BINPERSID BUILD PUT BINPUT "
    "LONG_BINPUT MEMOIZE GET BINGET LONG_BINGET".split())


class _TensorUnpickler(pickle._Unpickler):
    """The pure-Python unpickler with a checked opcode table (see the module docstring)."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, path: str,
                 limits: Limits):
        super().__init__(io.BytesIO(data))
        self._zip, self._prefix, self._path, self._limits = archive, prefix, path, limits
        self._storages: dict = {}
        self._ops = self._refs = 0
        self._left = limits.total_bytes
        # Stored once, so REDUCE can check the callable by identity.
        self._globals = {("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor,
                         ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
                         ("collections", "OrderedDict"): _ordered_dict}
        self._callables = list(self._globals.values())
        self._globals.update({("torch", n): t for n, t in _STORAGE_TYPES.items()})
        order = "little"
        if f"{prefix}/byteorder" in archive.namelist():
            raw = _read_entry(archive, f"{prefix}/byteorder", 16, "16 bytes", path)
            order = raw.decode("ascii", "replace").strip()
        if order not in ("little", "big"):
            raise ValueError(f"{path}: unknown byteorder {_short(order)} in the torch archive")
        self._order = "<" if order == "little" else ">"

    def _limit(self, what: str, value, name: str, limit) -> LimitError:
        return LimitError(f"{self._path}: refused: {what} ({value}) exceeds the limit "
                          f"{name} = {limit}")

    def _charge(self, nbytes: int, what: str, one_limit: int | None = None) -> None:
        """Books ``nbytes`` against the file's budget before they are allocated."""
        if one_limit is not None and nbytes > one_limit:
            raise self._limit(f"{what} would take {nbytes} bytes", "one tensor view",
                              "MAX_TENSOR_BYTES", one_limit)
        if nbytes > self._left:
            raise self._limit(f"{what} would take {nbytes} bytes", "all storages and tensors "
                              "of the file together", "MAX_TOTAL_BYTES", self._limits.total_bytes)
        self._left -= nbytes

    def find_class(self, module, name):
        try:
            return self._globals[(module, name)]
        except (KeyError, TypeError):
            raise UnsafePickleError(
                f"{self._path}: refusing to load: the pickle names the global {_short(module)}."
                f"{_short(name)}, which a tensor file does not need (allowed: "
                + ", ".join(sorted(f"{m}.{n}" for m, n in ALLOWED)) + ")") from None

    def persistent_load(self, pid):
        if not (type(pid) is tuple and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and type(pid[2]) is str
                and re.fullmatch(r"[0-9A-Za-z_]{1,64}", pid[2]) and type(pid[3]) is str):
            raise pickle.UnpicklingError(f"unsupported persistent record {_short(pid)}")
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

    def _check(self, name: str) -> None:
        """Counts the opcode and checks what it is about to do to the stack."""
        self._ops += 1
        if self._ops > self._limits.opcodes:
            raise self._limit("the pickle's opcodes", f"more than {self._limits.opcodes}",
                              "MAX_OPCODES", self._limits.opcodes)
        if name.endswith("GET"):
            self._refs += 1
            if self._refs > self._limits.memo_refs:
                raise self._limit("the pickle's memo references", self._refs, "MAX_MEMO_REFS",
                                  self._limits.memo_refs)
        elif name == "MARK" and len(self.metastack) >= self._limits.nesting:
            raise self._limit("the pickle's open MARKs", len(self.metastack) + 1, "MAX_NESTING",
                              self._limits.nesting)
        elif name in ("APPEND", "APPENDS"):
            target = self.stack[-2] if name == "APPEND" else self.metastack[-1][-1]
            if type(target) is not list:
                raise pickle.UnpicklingError(f"{name} to a {type(target).__name__}")
        elif name in ("SETITEM", "SETITEMS", "DICT"):
            target, keys = ((self.stack[-3], self.stack[-2:-1]) if name == "SETITEM" else
                            (self.metastack[-1][-1] if name == "SETITEMS" else {}, self.stack[::2]))
            if type(target) not in _DICTS or any(type(k) not in _SCALARS for k in keys):
                raise pickle.UnpicklingError(f"{name}: dict items need a dict and scalar keys "
                                             "(a container key is hashed in exponential time)")
        elif name == "REDUCE":
            func, args = self.stack[-2], self.stack[-1]
            if type(args) is not tuple or not any(func is f for f in self._callables):
                raise pickle.UnpicklingError(f"REDUCE of {_short(func)}: only the allowed "
                                             "functions can be called")

    def _build(self) -> None:
        """BUILD, allowed only as torch uses it: a state dict's ``_metadata``, which is dropped."""
        self._check("BUILD")
        state, target = self.stack[-1], self.stack[-2]
        if type(target) is not collections.OrderedDict or type(state) is not dict or any(
                type(k) is not str for k in state):
            raise UnsafePickleError(
                f"{self._path}: refusing to load: BUILD (__setstate__) on an object of type "
                f"{type(target).__name__}; only a state dict's OrderedDict carries state in a "
                "tensor file")
        self.stack.pop()  # the state (module versions) is not data: nothing is set


def _opcode_table() -> dict:
    """byte -> handler: the checked plain-data opcodes, every other byte refused."""
    names = {op.code.encode("latin-1")[0]: op.name for op in pickletools.opcodes}
    base = pickle._Unpickler.dispatch

    def checked(name, fn):
        def handler(self):
            self._check(name)
            fn(self)
        return handler

    def refused(name):
        def handler(self):
            raise UnsafePickleError(f"{self._path}: refusing to load: the pickle opcode {name}, "
                                    "which a tensor file does not use")
        return handler

    table = {}
    for code in range(256):
        name = names.get(code, f"0x{code:02x} (unknown)")
        table[code] = (refused(name) if name not in _PLAIN_OPS or code not in base else
                       _TensorUnpickler._build if name == "BUILD" else checked(name, base[code]))
    return table


_TensorUnpickler.dispatch = _opcode_table()


def _check_plain(obj, path: str, limits: Limits) -> None:
    """Arrays, scalars and plain containers only; no cycles; nesting and size within ``limits``.

    Each container is walked once (memoised by id) while its size *with* multiplicity is what is
    bounded: a structure doubling at every level (billion laughs) is refused in linear time.
    """
    sizes: dict = {}  # id -> objects below it, counted with multiplicity; -1 while walked

    def walk(x, depth: int) -> int:
        if depth > limits.nesting:
            raise LimitError(f"{path}: refused: the saved object is nested too deeply (more "
                             f"than MAX_NESTING = {limits.nesting} levels)")
        if isinstance(x, np.ndarray):
            if x.dtype.kind not in "biuf":
                raise ValueError(f"{path}: unexpected array dtype {x.dtype}")
            return 1
        if type(x) in _SCALARS:
            return 1
        if type(x) not in (list, tuple) + _DICTS:
            raise ValueError(f"{path}: unexpected object of type {type(x).__name__}")
        seen = sizes.get(id(x))
        if seen is not None:
            if seen < 0:
                raise ValueError(f"{path}: the saved object contains itself (a reference cycle)")
            return seen
        sizes[id(x)] = -1
        n = 1
        for item in (x if type(x) in (list, tuple) else (v for kv in x.items() for v in kv)):
            n += walk(item, depth + 1)
            if n > limits.objects:
                raise LimitError(f"{path}: refused: the saved object holds more than MAX_OBJECTS"
                                 f" = {limits.objects} objects (shared references counted each "
                                 "time they occur)")
        sizes[id(x)] = n
        return n

    walk(obj, 0)


def _archive_prefix(archive: zipfile.ZipFile, path: str) -> str:
    """The one top-level directory holding ``data.pkl`` (torch names it after the file)."""
    names = archive.namelist()
    tops = {n.split("/", 1)[0] for n in names}
    if len(tops) != 1 or f"{next(iter(tops))}/data.pkl" not in names:
        raise ValueError(f"{path}: not a torch.save file (a zip, but no <dir>/data.pkl among "
                         f"{_short(sorted(names)[:5])})")
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
    forbidden global or opcode (:class:`UnsafePickleError`) or exceeds ``limits`` (default
    :meth:`Limits.default`; :class:`LimitError`).
    """
    limits = limits or Limits.default()
    _refuse_non_zip(path)
    try:
        with zipfile.ZipFile(path) as archive:
            prefix = _archive_prefix(archive, path)
            data = _read_entry(archive, f"{prefix}/data.pkl", limits.pickle_bytes,
                               "MAX_PICKLE_BYTES", path)
            obj = _TensorUnpickler(data, archive, prefix, path, limits).load()
        _check_plain(obj, path, limits)
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
