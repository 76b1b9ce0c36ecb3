"""The npz importer is bounded like the .pt reader (torch_pickle's MAX_TENSOR_BYTES and
MAX_TOTAL_BYTES): an npz "zip bomb" (a few KB asking for gigabytes) is refused fast, before
inflating or allocating, with a one-line ValueError naming the file and the limit; object arrays
are refused; genuine npz files, deflated or not, still convert."""

import io
import os
import struct
import time
import tracemalloc
import zipfile

import numpy as np
import pytest

from dp_jax.cli import distill_tools
from dp_jax.distill import importers, torch_pickle

from conftest import ROOT

pytestmark = pytest.mark.timeout(20)

SET_NPZ = os.path.join(ROOT, "tests", "fixtures", "distilled", "set.npz")


def npy(shape, dtype="|u1", data=b"") -> bytes:
    """A .npy file whose header declares ``shape`` and ``dtype``, followed by ``data``."""
    f = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        f, {"descr": dtype, "fortran_order": False, "shape": tuple(shape)})
    return f.getvalue() + data


def write_npz(path, members: dict) -> str:
    """A deflated npz (zip) with ``members``: name -> bytes (``npy``) or array."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, raw in members.items():
            if isinstance(raw, np.ndarray):
                f = io.BytesIO()
                np.lib.format.write_array(f, raw, allow_pickle=True)
                raw = f.getvalue()
            z.writestr(name, raw)
    return str(path)


def _patch_size(path, name: bytes, size: int) -> None:
    """Rewrites the uncompressed size of member ``name`` in its local and central headers."""
    raw = bytearray(open(path, "rb").read())
    for sig, off_size, off_name in ((b"PK\x03\x04", 22, 30), (b"PK\x01\x02", 24, 46)):
        at = raw.find(sig)
        while at >= 0:
            if raw[at + off_name:at + off_name + len(name)] == name:
                raw[at + off_size:at + off_size + 4] = struct.pack("<I", size)
            at = raw.find(sig, at + 1)
    open(path, "wb").write(bytes(raw))


def convert(path, out):
    args = distill_tools.convert_args([f"--out={out}", "--format=npz", f"--npz={path}",
                                       "--lr=0.1", "--dataset=npz:/nonexistent.npz"])
    return importers.convert(args)


def refused(path, out, *needles, max_peak=8 << 20, max_seconds=5.0):
    """convert raises a one-line ValueError naming the file and ``needles``, quickly, without
    allocating more than ``max_peak`` bytes, writing nothing."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(ValueError) as e:
            convert(path, out)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    msg = str(e.value)
    assert msg.startswith(path) and "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    assert time.perf_counter() - start < max_seconds, msg
    assert peak < max_peak, (peak, msg)
    assert not os.path.exists(out)
    return msg


def test_member_declaring_gigabytes_refused_before_inflating(tmp_path):
    """An 'images' member whose zip header declares ~4 GiB (8 MiB of zeros really: ~8 KB)."""
    path = write_npz(tmp_path / "bomb.npz", {"images.npy": npy((8 << 20,), data=bytes(8 << 20)),
                                             "labels.npy": np.zeros(2, np.int64)})
    assert os.path.getsize(path) < 20_000
    _patch_size(path, b"images.npy", 0xFFFFFFF0)
    refused(path, tmp_path / "out.npz", "refused", "images.npy declares 4294967280 bytes",
            "MAX_TENSOR_BYTES = 1073741824")


def test_zeros_bomb_refused_by_the_per_array_limit(tmp_path, monkeypatch):
    """A genuine 16 MiB array of zeros deflates to ~16 KB; a lower limit refuses it unread."""
    monkeypatch.setattr(torch_pickle, "MAX_TENSOR_BYTES", 1 << 20)
    path = write_npz(tmp_path / "zeros.npz", {"images.npy": np.zeros(16 << 20, np.uint8),
                                              "labels.npy": np.zeros(2, np.int64)})
    assert os.path.getsize(path) < 40_000
    refused(path, tmp_path / "out.npz", "images.npy declares", "MAX_TENSOR_BYTES = 1048576")


def test_header_shape_refused_before_allocating(tmp_path):
    """The .npy header asks for 2**40 float32 (4 TiB) over a few bytes; the zip header is honest."""
    path = write_npz(tmp_path / "shape.npz", {"images.npy": npy((1 << 40,), "<f4", bytes(16)),
                                              "labels.npy": np.zeros(2, np.int64)})
    refused(path, tmp_path / "out.npz", "images.npy (shape (1099511627776,), float32)",
            "4398046511104 bytes", "MAX_TENSOR_BYTES = 1073741824")


def test_arrays_together_refused_by_the_total_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(torch_pickle, "MAX_TOTAL_BYTES", 5 << 20)
    path = write_npz(tmp_path / "two.npz", {"images.npy": np.zeros(3 << 20, np.uint8),
                                            "labels.npy": np.zeros(3 << 20, np.uint8)})
    refused(path, tmp_path / "out.npz", "labels.npy", "6291456 bytes",
            "MAX_TOTAL_BYTES = 5242880", max_peak=16 << 20)


def test_member_longer_than_its_header_is_read_only_that_far(tmp_path):
    """The header says 2 bytes; 64 MiB of zeros follow (~64 KB deflated): they are not inflated."""
    path = write_npz(tmp_path / "long.npz", {"images.npy": npy((2,), data=bytes(64 << 20)),
                                             "labels.npy": np.zeros(2, np.int64)})
    args = distill_tools.convert_args([f"--out={tmp_path / 'out.npz'}", "--format=npz",
                                       f"--npz={path}", "--lr=0.1", "--dataset=npz:x.npz"])
    tracemalloc.start()
    try:
        src = importers._read_npz(args)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert src["images"].shape == (2,) and peak < 8 << 20, peak


def test_object_arrays_and_truncated_members_refused(tmp_path):
    objects = write_npz(tmp_path / "obj.npz", {"images.npy": np.array([None, {}], object),
                                               "labels.npy": np.zeros(2, np.int64)})
    refused(objects, tmp_path / "out.npz", "not a readable .npz", "object arrays")
    short = write_npz(tmp_path / "short.npz", {"images.npy": npy((100,), data=bytes(10)),
                                               "labels.npy": np.zeros(2, np.int64)})
    refused(short, tmp_path / "out.npz", "not a readable .npz")


def test_genuine_npz_converts_deflated_and_unread_members_ignored(tmp_path, toy_npz):
    with np.load(SET_NPZ) as z:
        arrays = {k: z[k] for k in z.files}
    np.savez_compressed(tmp_path / "deflated.npz", **arrays)
    # A bomb in a member the importer does not use is never read.
    bombed = write_npz(tmp_path / "extra.npz", {**{f"{k}.npy": v for k, v in arrays.items()},
                                                "extra.npy": npy((1 << 40,))})
    want = importers.convert(distill_tools.convert_args(
        [f"--out={tmp_path / 'a.npz'}", "--format=npz", f"--npz={SET_NPZ}",
         f"--dataset=npz:{toy_npz}"]))
    for i, path in enumerate([tmp_path / "deflated.npz", bombed]):
        got = importers.convert(distill_tools.convert_args(
            [f"--out={tmp_path / f'{i}.npz'}", "--format=npz", f"--npz={path}",
             f"--dataset=npz:{toy_npz}"]))
        np.testing.assert_array_equal(got.images, want.images)
        np.testing.assert_array_equal(got.labels, want.labels)
        assert got.lr == want.lr
