"""The checked unpickler ``torch_pickle`` reads ``data.pkl`` with: runs no code, bounded.

:class:`SafeUnpickler` is the pure-Python :class:`pickle._Unpickler` with its own opcode table:
only plain-data, memo, global and persistent-id opcodes exist, each checked first (any other opcode
raises :class:`UnsafePickleError`). ``find_class`` resolves only the globals it is given (any
other raises :class:`UnsafePickleError` when named), REDUCE calls only the functions among them,
dict keys must be scalars (hashing a nested tuple is exponential), BUILD sets nothing (torch emits
it only for a state dict's ``OrderedDict._metadata``, dropped). Opcodes, memo references and open
MARKs are counted against the limits as they are read; :func:`check_plain` then walks the result
(plain data only, no cycles, nesting and objects counted with multiplicity bounded). A refusal is
a one-line :class:`LimitError` (a ``ValueError``) naming the file and the limit; messages show
attacker-controlled data through :func:`short_repr` only.
"""

from __future__ import annotations

import collections
import io
import pickle
import pickletools
import reprlib

import numpy as np

SCALARS = (str, int, float, bool, type(None))
DICTS = (dict, collections.OrderedDict)


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


def short_repr(x) -> str:
    """A bounded one-line repr of attacker-controlled data (a full repr can be exponential)."""
    return _REPR.repr(x).replace("\n", " ")


# The opcodes a plain-data pickle with globals and persistent ids needs; everything else (INST,
# OBJ, NEWOBJ*, EXT*, PERSID, DUP, bytes, sets, buffers, ...) is refused when it is read.
_PLAIN_OPS = frozenset(
    "PROTO FRAME STOP MARK POP POP_MARK INT BININT BININT1 BININT2 LONG LONG1 LONG4 FLOAT "
    "BINFLOAT STRING BINSTRING SHORT_BINSTRING UNICODE BINUNICODE SHORT_BINUNICODE BINUNICODE8 "
    "NONE NEWTRUE NEWFALSE EMPTY_TUPLE TUPLE TUPLE1 TUPLE2 TUPLE3 EMPTY_LIST LIST APPEND APPENDS "
    "EMPTY_DICT DICT SETITEM SETITEMS GLOBAL STACK_GLOBAL REDUCE BINPERSID BUILD PUT BINPUT "
    "LONG_BINPUT MEMOIZE GET BINGET LONG_BINGET".split())


class SafeUnpickler(pickle._Unpickler):
    """The pure-Python unpickler with a checked opcode table (see the module docstring).

    ``functions`` maps ``(module, name)`` to what the pickle may name and REDUCE may call,
    ``constants`` to what it may only name; ``limits`` gives ``opcodes``, ``memo_refs`` and
    ``nesting`` (a ``torch_pickle.Limits``). A subclass adds ``persistent_load``.
    """

    def __init__(self, data: bytes, path: str, limits, functions: dict, constants: dict):
        super().__init__(io.BytesIO(data))
        self._path, self._limits = path, limits
        self._ops = self._refs = 0
        self._globals = {**functions, **constants}
        self._callables = list(functions.values())  # REDUCE checks the callable by identity

    def _limit(self, what: str, value, name: str, limit) -> LimitError:
        return LimitError(f"{self._path}: refused: {what} ({value}) exceeds the limit "
                          f"{name} = {limit}")

    def find_class(self, module, name):
        try:
            return self._globals[(module, name)]
        except (KeyError, TypeError):
            raise UnsafePickleError(
                f"{self._path}: refusing to load: the pickle names the global "
                f"{short_repr(module)}.{short_repr(name)}, which a tensor file does not need "
                "(allowed: " + ", ".join(sorted(f"{m}.{n}" for m, n in self._globals))
                + ")") from None

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
            if type(target) not in DICTS or any(type(k) not in SCALARS for k in keys):
                raise pickle.UnpicklingError(f"{name}: dict items need a dict and scalar keys "
                                             "(a container key is hashed in exponential time)")
        elif name == "REDUCE":
            func, args = self.stack[-2], self.stack[-1]
            if type(args) is not tuple or not any(func is f for f in self._callables):
                raise pickle.UnpicklingError(f"REDUCE of {short_repr(func)}: only the allowed "
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
                       SafeUnpickler._build if name == "BUILD" else checked(name, base[code]))
    return table


SafeUnpickler.dispatch = _opcode_table()


def check_plain(obj, path: str, limits) -> None:
    """Arrays, scalars and plain containers only; no cycles; nesting and size within ``limits``
    (its ``nesting`` and ``objects``).

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
        if type(x) in SCALARS:
            return 1
        if type(x) not in (list, tuple) + DICTS:
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
