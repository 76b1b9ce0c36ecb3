"""The torch-free .pt reader is bounded: crafted files asking for memory, time or mutation are
refused fast, before allocating, with a one-line ValueError naming the file and the limit; genuine
torch.save files (dict, list, tuple, state dict, protocols 2/4/5) still load equal to torch.

The crafted files are written opcode by opcode (``pickle``'s opcode constants) in torch's zip
layout: ``archive/data.pkl``, ``archive/data/<key>``, ``archive/byteorder``.
"""

import dataclasses
import pickle
import struct
import time
import tracemalloc
import zipfile

import numpy as np
import pytest

from dp_jax.distill import safe_unpickler, torch_pickle

pytestmark = pytest.mark.timeout(20)

REBUILD = b"ctorch._utils\n_rebuild_tensor_v2\n"
HOOKS = b"ccollections\nOrderedDict\n)R"


def text(s: str) -> bytes:
    return pickle.BINUNICODE + struct.pack("<I", len(s)) + s.encode()


def ints(xs) -> bytes:
    """A tuple of ints (BININT: 4-byte signed, LONG1 for the larger ones)."""
    out = b"("
    for x in xs:
        if -2**31 <= x < 2**31:
            out += pickle.BININT + struct.pack("<i", x)
        else:
            raw = x.to_bytes(9, "little", signed=True)
            out += pickle.LONG1 + bytes([len(raw)]) + raw
    return out + pickle.TUPLE


def tensor(key="0", numel=1, size=(1,), stride=(1,), stype=b"FloatStorage") -> bytes:
    """A ``_rebuild_tensor_v2`` record as torch.save writes it (the REDUCE left on the stack)."""
    pid = (b"(" + text("storage") + b"ctorch\n" + stype + b"\n" + text(key) + text("cpu")
           + ints([numel])[1:-1] + b"t")
    return (REBUILD + b"(" + pid + pickle.BINPERSID + ints([0])[1:-1] + ints(size) + ints(stride)
            + pickle.NEWFALSE + HOOKS + b"tR")


def write(path, body: bytes, storages=None, compress=zipfile.ZIP_STORED) -> str:
    """A torch-layout zip whose data.pkl is ``body`` (+ STOP); ``storages``: key -> bytes."""
    with zipfile.ZipFile(path, "w", compress) as z:
        z.writestr("archive/data.pkl", b"\x80\x02" + body + pickle.STOP)
        z.writestr("archive/byteorder", "little")
        for key, raw in (storages or {}).items():
            z.writestr(f"archive/data/{key}", raw)
    return str(path)


def refused(path, *needles, max_peak=32 << 20, max_seconds=5.0):
    """Asserts load(path) raises a one-line ValueError naming the file and ``needles``, quickly
    and without allocating more than ``max_peak`` bytes on the way."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(ValueError) as e:
            torch_pickle.load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    msg = str(e.value)
    assert msg.startswith(path) and "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    assert time.perf_counter() - start < max_seconds, msg
    assert peak < max_peak, (peak, msg)
    return msg


FLOAT4 = {"0": np.float32(7).tobytes()}


# ---- memory: tensor views and storages --------------------------------------------------------

def test_stride0_view_of_two_gib_refused_before_allocating(tmp_path):
    """600 bytes asking an 8-byte storage for 2**28 float64 elements (2 GiB), stride 0."""
    record = tensor(size=(1 << 28,), stride=(0,), stype=b"DoubleStorage")
    path = write(tmp_path / "big.pt", record, {"0": np.float64(7).tobytes()})
    assert (tmp_path / "big.pt").stat().st_size < 1000
    refused(path, "refused", "2147483648 bytes", "MAX_TENSOR_BYTES")


def test_many_stride0_views_hit_the_total_budget(tmp_path, monkeypatch):
    """Each view fits the per-tensor limit; together they exceed the file's total."""
    monkeypatch.setattr(torch_pickle, "MAX_TOTAL_BYTES", 8 << 20)
    view = tensor(size=(3 << 18,), stride=(0,))  # 3 MiB of float32 each
    path = write(tmp_path / "many.pt", b"](" + view * 10 + b"e", FLOAT4)
    refused(path, "MAX_TOTAL_BYTES = 8388608", "all storages and tensors", max_peak=16 << 20)
    # Under the budget the same views load, equal to the one stored value.
    monkeypatch.setattr(torch_pickle, "MAX_TOTAL_BYTES", 32 << 20)
    views = torch_pickle.load(path)
    assert len(views) == 10 and all(v.shape == (3 << 18,) and (v == 7).all() for v in views)


def test_limits_can_be_passed_explicitly(tmp_path):
    path = write(tmp_path / "t.pt", tensor(size=(1000,), stride=(0,)), FLOAT4)
    small = dataclasses.replace(torch_pickle.Limits.default(), tensor_bytes=3999)
    with pytest.raises(safe_unpickler.LimitError, match="MAX_TENSOR_BYTES = 3999"):
        torch_pickle.load(path, small)
    assert torch_pickle.load(path).shape == (1000,)


def test_storage_entry_counted_before_it_is_inflated(tmp_path, monkeypatch):
    """A 64 MiB storage of zeros deflates to ~64 KB; the budget is checked on its record."""
    monkeypatch.setattr(torch_pickle, "MAX_TOTAL_BYTES", 1 << 20)
    path = write(tmp_path / "zeros.pt", tensor(numel=1 << 24, size=(1,)),
                 {"0": bytes(64 << 20)}, compress=zipfile.ZIP_DEFLATED)
    refused(path, "storage '0'", "67108864 bytes", "MAX_TOTAL_BYTES = 1048576")


# ---- the zip: data.pkl and its header -----------------------------------------------------------

def test_inflated_pickle_refused_by_declared_size(tmp_path, monkeypatch):
    """data.pkl inflating to 1 MiB from ~1 KB: its declared size is checked before reading."""
    monkeypatch.setattr(torch_pickle, "MAX_PICKLE_BYTES", 64 << 10)
    body = b"N" + b"0N" * (1 << 19)  # 1 MiB of opcodes, deflated to ~1 KB
    path = write(tmp_path / "bomb.pt", body, compress=zipfile.ZIP_DEFLATED)
    assert (tmp_path / "bomb.pt").stat().st_size < 10_000
    refused(path, "archive/data.pkl declares", "MAX_PICKLE_BYTES = 65536")
    # Under the default limit: a header declaring 2 GiB is refused before anything is inflated.
    monkeypatch.undo()
    _patch_sizes(path, b"archive/data.pkl", 2 << 30)
    refused(path, "declares 2147483648 bytes", f"MAX_PICKLE_BYTES = {64 << 20}")


def _patch_sizes(path, name: bytes, size: int) -> None:
    """Rewrites the uncompressed size of member ``name`` in its local and central headers."""
    raw = bytearray(open(path, "rb").read())
    for sig, off_size, off_name in ((b"PK\x03\x04", 22, 30), (b"PK\x01\x02", 24, 46)):
        at = raw.find(sig)
        while at >= 0:
            if raw[at + off_name:at + off_name + len(name)] == name:
                raw[at + off_size:at + off_size + 4] = struct.pack("<I", size)
            at = raw.find(sig, at + 1)
    open(path, "wb").write(bytes(raw))


def test_pickle_whose_header_understates_its_size(tmp_path):
    """The header says 100 bytes, the entry inflates to 1 MiB: no more than that is read."""
    path = write(tmp_path / "liar.pt", b"N" + b"0N" * (1 << 19), compress=zipfile.ZIP_DEFLATED)
    _patch_sizes(path, b"archive/data.pkl", 100)
    refused(path, "malformed torch file")


def test_storage_whose_header_overstates_its_size(tmp_path):
    """The header promises the 4 MiB the record needs; the entry holds 4 bytes."""
    path = write(tmp_path / "short.pt", tensor(numel=1 << 20, size=(1,)), FLOAT4)
    _patch_sizes(path, b"archive/data/0", 4 << 20)
    refused(path, "malformed torch file")


# ---- time: shared references, opcodes, nesting --------------------------------------------------

def _laughs(levels: int, leaf: bytes, pair: bytes) -> bytes:
    """Pushes the top of a structure whose level i is two references to level i-1 (memo gets):
    2**levels leaves, ~9 bytes a level. The levels are built inside a MARK that is then popped,
    so only the memo keeps them."""
    out = pickle.MARK + leaf + pickle.BINPUT + b"\x00"
    for i in range(1, levels + 1):
        out += pair.replace(b"@", pickle.BINGET + bytes([i - 1])) + pickle.BINPUT + bytes([i])
    return out + pickle.POP_MARK + pickle.BINGET + bytes([levels])


def test_billion_laughs_list_refused_in_linear_time(tmp_path):
    body = _laughs(30, b"]K\x01a", b"](@@e")  # 2**30 leaves in ~280 bytes, 31 levels deep
    path = write(tmp_path / "laughs.pt", body)
    assert (tmp_path / "laughs.pt").stat().st_size < 720
    refused(path, "MAX_OBJECTS", "shared references", max_seconds=2.0)


def test_billion_laughs_as_dict_key_refused_before_hashing(tmp_path):
    """Hashing a doubling tuple is exponential: container keys are refused before SETITEM."""
    body = b"}" + _laughs(60, b"K\x01K\x01\x86", b"@@\x86") + b"K\x00s"
    refused(write(tmp_path / "key.pt", body), "scalar keys", max_seconds=2.0)


def test_billion_laughs_in_a_tensor_record_gets_a_short_message(tmp_path):
    """The error message reprs the offending size: bounded, one line."""
    record = (REBUILD + b"(" + b"(" + text("storage") + b"ctorch\nFloatStorage\n" + text("0")
              + text("cpu") + b"K\x01tQK\x00" + _laughs(60, b"K\x01K\x01\x86", b"@@\x86")
              + b"(K\x01t\x89" + HOOKS + b"tR")
    msg = refused(write(tmp_path / "size.pt", record, FLOAT4), "tensor size ((((...), (...)),",
                  "must be tuples of equal length", max_seconds=2.0)
    assert len(msg) < 600


def test_error_messages_do_not_repr_arrays(tmp_path):
    """numpy would print all 16M elements of a (2,)*24 view; the message gives its shape."""
    inner = tensor(size=(2,) * 24, stride=(0,) * 24, stype=b"BoolStorage")
    record = REBUILD + b"(" + inner + ints([0])[1:-1] + b")))\x89" + HOOKS + b"tR"
    msg = refused(write(tmp_path / "arr.pt", record, {"0": b"\x01"}),
                  "storage must be a storage record, got <bool array of shape (2, 2",
                  max_peak=64 << 20, max_seconds=3.0)
    assert len(msg) < 600


def test_cycle_refused(tmp_path):
    body = b"]" + pickle.BINPUT + b"\x00" + pickle.BINGET + b"\x00" + pickle.APPEND
    refused(write(tmp_path / "cycle.pt", body), "contains itself")


def test_opcode_and_memo_reference_limits(tmp_path, monkeypatch):
    many = write(tmp_path / "ops.pt", b"N0" * 1_100_000 + b"N")  # defaults: 2**20 opcodes
    refused(many, "MAX_OPCODES = 1048576")
    monkeypatch.setattr(torch_pickle, "MAX_MEMO_REFS", 100)
    gets = b"Nq\x00" + b"h\x000" * 101
    refused(write(tmp_path / "gets.pt", gets), "memo references", "MAX_MEMO_REFS = 100")


def test_nesting_limits(tmp_path):
    marks = write(tmp_path / "marks.pt", b"(" * 40 + b"N")
    refused(marks, "open MARKs", "MAX_NESTING = 32")
    deep = write(tmp_path / "deep.pt", b"]" * 40 + b"a" * 39)  # [[[...]]], 40 levels
    refused(deep, "nested too deeply", "MAX_NESTING = 32")


# ---- mutation and code: BUILD and other opcodes -------------------------------------------------

MARKER = b"}" + text("marker") + b"K\x01s"


@pytest.mark.parametrize("target, state", [
    (REBUILD, MARKER), (b"ctorch._utils\n_rebuild_parameter\n", MARKER),
    (b"ctorch\nFloatStorage\n", MARKER), (b"ccollections\nOrderedDict\n", MARKER),
    (HOOKS, b"(N" + MARKER + b"t"),  # an OrderedDict made here, but slot state: not torch's form
])
def test_build_on_reader_objects_refused(tmp_path, target, state):
    """BUILD would set attributes of the reader's own functions for the rest of the process."""
    refused(write(tmp_path / "build.pt", target + state + pickle.BUILD), "BUILD (__setstate__)")
    assert not hasattr(torch_pickle._rebuild_parameter, "marker")
    assert not hasattr(torch_pickle._TensorUnpickler._rebuild_tensor, "marker")
    assert not hasattr(torch_pickle._STORAGE_TYPES["FloatStorage"], "marker")
    assert not hasattr(torch_pickle._ordered_dict, "marker")


@pytest.mark.parametrize("body, op", [
    (b"ccollections\nOrderedDict\n)\x81", "NEWOBJ"),
    (b"(ios\nsystem\n", "INST"),
    (b"\x82\x01", "EXT1"),
    (b"Pfoo\n", "PERSID"),
    (b"N2", "DUP"),
    (b"C\x01x", "SHORT_BINBYTES"),
])
def test_unneeded_opcodes_refused(tmp_path, body, op):
    refused(write(tmp_path / "op.pt", body), "refusing to load", f"opcode {op}")


def test_reduce_only_calls_allowed_functions(tmp_path):
    # An OrderedDict called with items would hash them; a list on the stack is not callable code.
    od = b"ccollections\nOrderedDict\n(]tR"
    refused(write(tmp_path / "od.pt", od), "OrderedDict called with arguments")
    lst = b"](tR"
    refused(write(tmp_path / "lst.pt", lst), "only the allowed functions")


# ---- genuine torch.save files still load ---------------------------------------------------------

def _same(ours, ref):
    import torch
    if isinstance(ref, torch.Tensor):
        want = ref.detach().float() if ref.dtype == torch.bfloat16 else ref.detach()
        want = want.numpy()
        assert ours.dtype == want.dtype and ours.shape == want.shape
        np.testing.assert_array_equal(ours, want)
    elif isinstance(ref, (list, tuple, dict)):
        assert type(ours) is type(ref) and len(ours) == len(ref)
        for a, b in (zip(ours.values(), ref.values()) if isinstance(ref, dict) else zip(ours, ref)):
            _same(a, b)
        if isinstance(ref, dict):
            assert list(ours) == list(ref)
    else:
        assert ours == ref


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_genuine_torch_files_load_equal(tmp_path, protocol):
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(20, 1, 8, 8, generator=g), torch.arange(10).repeat(2)
    x = torch.randn(4, 6, generator=g)
    saved = {
        "dict": {"images": images, "labels": labels},
        "list": [images, labels],  # IDC's torch.save([synset.data, synset.targets], ...)
        "tuple": (images, labels),
        "one": images,  # MTT's images_best.pt / labels_best.pt
        "lr": torch.tensor(0.01),
        "views": [x, x.t(), x[1:, ::2], torch.zeros(1).expand(5), x.half(), x.bfloat16(),
                  x.double(), x.int(), x > 0, torch.nn.Parameter(x.clone()), torch.zeros(0, 3)],
        "state_dict": torch.nn.Linear(3, 2).state_dict(),  # BUILD of OrderedDict._metadata
    }
    for name, obj in saved.items():
        path = tmp_path / f"{name}.pt"
        torch.save(obj, path, pickle_protocol=protocol)
        _same(torch_pickle.load(str(path)), torch.load(path, weights_only=False))
    images_np, labels_np = torch_pickle.load_arrays(str(tmp_path / "list.pt"), "data", "target")
    np.testing.assert_array_equal(images_np, images.numpy())
    np.testing.assert_array_equal(labels_np, labels.numpy())
    assert not hasattr(torch_pickle.load(str(tmp_path / "state_dict.pt")), "_metadata")
