"""Importing MTT / IDC / npz distilled sets: decoding, the safe torch reader, bad input, end to end.

The .pt fixtures under tests/fixtures/distilled/ were written by real torch
(tests/scripts/make_distilled_fixtures.py); ``expected.npz`` holds what torch read back and IDC's
own decoding, so the torch-free reader and the NumPy decoder are checked against torch.
"""

import os
import pickle
import zipfile

import numpy as np
import pytest

from dp_jax.storage import fileio
from dp_jax.data import apply_preprocessing, load_dataset
from dp_jax.distill import check_compatible, load_distilled
from dp_jax.cli import distill_tools
from dp_jax.distill import importers as convert
from dp_jax.distill import safe_unpickler, torch_pickle

from conftest import ROOT, make_npz

FIX = os.path.join(ROOT, "tests", "fixtures", "distilled")


def fix(name):
    return os.path.join(FIX, name)


@pytest.fixture(scope="module")
def expected():
    with np.load(fix("expected.npz")) as z:
        return {k: z[k] for k in z.files}


def run(out, *flags):
    """convert with ``flags``; returns the set it wrote."""
    return convert.convert(distill_tools.convert_args([f"--out={out}", *flags]))


def toy_dataset(toy_npz, kind="standard"):
    return load_dataset({"name": f"npz:{toy_npz}", "preprocess": kind}, seed=0)


# ---- IDC multi-formation --------------------------------------------------------------------

def test_idc_decode_constant_blocks_order():
    """Blocks (0,0),(0,1),(1,0),(1,1) hold 1,2,3,4 (+10 for the 2nd image): crop-major per class."""
    block = np.kron(np.array([[1., 2.], [3., 4.]]), np.ones((2, 2)))[None, :, :, None]
    stored = np.concatenate([block, block + 10, block + 20]).astype(np.float32)
    images, labels = convert.idc_decode(stored, np.array([0, 0, 1]), 2)
    assert images.shape == (12, 4, 4, 1)
    for img in images:  # each decoded image is one upsampled constant block
        assert np.all(img == img[0, 0, 0])
    # class 0 (stored 0, 1): crop (0,0) of both, crop (0,1) of both, ...; then class 1.
    np.testing.assert_array_equal(images[:, 0, 0, 0], [1, 11, 2, 12, 3, 13, 4, 14, 21, 22, 23, 24])
    np.testing.assert_array_equal(labels, [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1])


def _bilinear_reference(img, out_h, out_w):
    """Per-pixel bilinear, PyTorch align_corners=False: src = (dst + .5) * in/out - .5, >= 0."""
    in_h, in_w = img.shape
    out = np.zeros((out_h, out_w))
    for y in range(out_h):
        sy = max((y + 0.5) * in_h / out_h - 0.5, 0.0)
        y0 = int(sy)
        y1, ly = min(y0 + 1, in_h - 1), sy - y0
        for x in range(out_w):
            sx = max((x + 0.5) * in_w / out_w - 0.5, 0.0)
            x0 = int(sx)
            x1, lx = min(x0 + 1, in_w - 1), sx - x0
            out[y, x] = ((1 - ly) * ((1 - lx) * img[y0, x0] + lx * img[y0, x1])
                         + ly * ((1 - lx) * img[y1, x0] + lx * img[y1, x1]))
    return out


def test_idc_decode_bilinear_rule():
    # A 2x2 ramp block upsampled to 4x4: edge pixels copy, inner ones are 1/4 - 3/4 mixtures
    # (align_corners=True would give thirds instead).
    stored = np.zeros((1, 4, 4, 1), np.float32)
    stored[0, :2, :2, 0] = [[0, 4], [8, 12]]
    images, _ = convert.idc_decode(stored, np.array([3]), 2)
    np.testing.assert_allclose(images[0, :, :, 0], [[0, 1, 3, 4], [2, 3, 5, 6], [6, 7, 9, 10],
                                                    [8, 9, 11, 12]], atol=1e-6)
    rng = np.random.default_rng(0)
    for size, factor in ((8, 2), (8, 4), (6, 3)):
        stored = rng.normal(size=(2, size, size, 2)).astype(np.float32)
        images, _ = convert.idc_decode(stored, np.array([0, 1]), factor)
        s = size // factor
        for k in range(factor * factor):
            i, j = divmod(k, factor)
            for img in range(2):
                for ch in range(2):
                    ref = _bilinear_reference(stored[img, i * s:(i + 1) * s, j * s:(j + 1) * s, ch],
                                              size, size)
                    # one image per class run, so run `img` has crop k at position img*f*f + k
                    np.testing.assert_allclose(images[img * factor ** 2 + k, :, :, ch], ref,
                                               atol=1e-5)


def test_idc_decode_matches_torch_and_project(expected):
    """Against IDC's own decode_zoom run in torch, and the project's multi-formation decoder."""
    from dp_jax.distill import synthetic
    data = expected["idc_data"].transpose(0, 2, 3, 1)
    labels = np.repeat(np.arange(10), 2)
    images, dec_labels = convert.idc_decode(data, labels, 2)
    np.testing.assert_allclose(images, expected["idc_decoded"].transpose(0, 2, 3, 1), atol=1e-6)
    np.testing.assert_array_equal(dec_labels, expected["idc_decoded_labels"])
    ours, _ = convert.idc_decode(data[:2], labels[:2], 2)
    theirs, _ = synthetic.decode(data[:2], labels[:2], 2)  # order: image-major
    np.testing.assert_allclose(ours[[k * 2 + i for i in range(2) for k in range(4)]],
                               np.asarray(theirs), atol=1e-6)


# ---- the torch-free reader ------------------------------------------------------------------

def test_reader_matches_torch(expected):
    views = torch_pickle.load(fix("views.pt"))
    for key, value in views.items():
        ref = expected[f"views_{key}"]
        assert value.dtype == ref.dtype and value.shape == ref.shape, key
        np.testing.assert_array_equal(value, ref)
    assert float(torch_pickle.load(fix("mtt_lr.pt"))) == pytest.approx(0.02)


class _Evil:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return self.fn, (self.arg,)


def _payloads(marker):
    import builtins
    import subprocess
    return [(os.system, f"touch {marker}"),
            (builtins.exec, f"open({str(marker)!r}, 'w').close()"),
            (subprocess.getoutput, f"touch {marker}")]


@pytest.mark.parametrize("which", range(3))
@pytest.mark.parametrize("wrap", ["zip", "plain"])
def test_malicious_pickle_refused(tmp_path, which, wrap):
    marker = tmp_path / "MARKER"
    payload = pickle.dumps([_Evil(*_payloads(marker)[which])], protocol=2)
    path = tmp_path / "images_best.pt"
    if wrap == "zip":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("archive/data.pkl", payload)
            z.writestr("archive/byteorder", "little")
    else:
        path.write_bytes(payload)
    with pytest.raises(ValueError, match="refus") as e:
        torch_pickle.load(str(path))
    assert "images_best.pt" in str(e.value)
    if wrap == "zip":
        assert isinstance(e.value, safe_unpickler.UnsafePickleError)
        assert "global" in str(e.value)
    out = tmp_path / "out.npz"
    with pytest.raises(ValueError, match="images_best.pt"):
        run(out, "--format=mtt", f"--images={path}", f"--labels={fix('mtt_labels.pt')}",
            "--lr=0.1", "--dataset=npz:/nonexistent.npz")
    assert not marker.exists() and not out.exists()


def _tensor_pickle(key="0", numel=4, offset=0, size=(4,), stride=(1,),
                   stype=b"ctorch\nFloatStorage\n"):
    """A tensor record in protocol-2 opcodes, as torch.save writes it."""
    def text(s):
        return b"X" + len(s).to_bytes(4, "little") + s.encode()

    def ints(xs):
        return b"(" + b"".join(b"J" + x.to_bytes(4, "little", signed=True) for x in xs) + b"t"
    pid = b"(" + text("storage") + stype + text(key) + text("cpu") + ints([numel])[1:-1] + b"t"
    return (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(" + pid + b"Q" + ints([offset])[1:-1]
            + ints(size) + ints(stride) + b"\x89ccollections\nOrderedDict\n)RtR.")


@pytest.mark.parametrize("change, match", [
    ({}, None),
    ({"numel": 5, "size": (5,)}, "holds 16 bytes"),
    ({"key": "../x"}, "persistent record"),
    ({"stype": b"X\x0c\x00\x00\x00FloatStorage"}, "persistent record"),
    ({"size": (5,)}, "runs past its storage"),
    ({"offset": 1, "size": (2, 2), "stride": (2, 1)}, "runs past its storage"),
    ({"size": (2,), "stride": (-1,)}, "negative strides"),
])
def test_reader_checks_storage_records(tmp_path, change, match):
    """Storage records and views are bounds-checked against the archive's bytes."""
    path = tmp_path / "t.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("t/data.pkl", _tensor_pickle(**change))
        z.writestr("t/data/0", np.arange(4, dtype="<f4").tobytes())
    if match is None:
        np.testing.assert_array_equal(torch_pickle.load(str(path)), [0, 1, 2, 3])
        return
    with pytest.raises(ValueError, match=match) as e:
        torch_pickle.load(str(path))
    assert "t.pt" in str(e.value)


# ---- imports --------------------------------------------------------------------------------

MTT = ["--format=mtt", f"--images={fix('mtt_images.pt')}", f"--labels={fix('mtt_labels.pt')}"]


def test_mtt_import(tmp_path, toy_npz, expected):
    out = tmp_path / "d.npz"
    run(out, *MTT, f"--lr_file={fix('mtt_lr.pt')}", f"--dataset=npz:{toy_npz}")
    dset = load_distilled(str(out))
    check_compatible(dset, toy_dataset(toy_npz))
    np.testing.assert_array_equal(dset.images, expected["mtt_images"].transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(dset.labels, expected["mtt_labels"])
    assert dset.lr == pytest.approx(0.02) and dset.factor == 1
    prov = dset.meta["provenance"]
    assert prov["format"] == "mtt" and prov["stored_images"] == 20 and prov["factor"] == 1
    assert prov["lr_source"] == f"file {fix('mtt_lr.pt')}"
    assert prov["label_source"] == fix("mtt_labels.pt")
    assert set(prov["sources"]) == {"images", "labels", "lr"}
    assert prov["preprocessing"]["kind"] == "standard"
    # The same set declared as ZCA lives in the ZCA space only.
    run(tmp_path / "z.npz", *MTT, "--lr=0.01", f"--dataset=npz:{toy_npz}", "--preprocess=zca")
    zset = load_distilled(str(tmp_path / "z.npz"))
    check_compatible(zset, toy_dataset(toy_npz, "zca"))
    with pytest.raises(ValueError, match="different preprocessing"):
        check_compatible(zset, toy_dataset(toy_npz))


def test_idc_import(tmp_path, toy_npz, expected):
    out = tmp_path / "d.npz"
    run(out, "--format=idc", f"--data={fix('idc_data.pt')}", "--factor=2", "--lr=0.01",
        f"--dataset=npz:{toy_npz}")
    dset = load_distilled(str(out))
    ds = toy_dataset(toy_npz)
    check_compatible(dset, ds)
    # IDC's sets are pixels: decoded as IDC does, then put through the dataset's preprocessing.
    want = apply_preprocessing(expected["idc_decoded"].transpose(0, 2, 3, 1), ds.preprocessing)
    np.testing.assert_allclose(dset.images, want, atol=1e-5)
    np.testing.assert_array_equal(dset.labels, expected["idc_decoded_labels"])
    assert dset.factor == 2 and dset.stored_images.shape == (20, 8, 8, 1)
    assert dset.meta["provenance"]["images"] == 80


def test_npz_import_and_layouts(tmp_path, toy_npz):
    out = tmp_path / "d.npz"
    dset = run(out, "--format=npz", f"--npz={fix('set.npz')}", f"--dataset=npz:{toy_npz}")
    assert dset.lr == pytest.approx(0.03) and len(dset) == 20
    assert dset.meta["provenance"]["lr_source"].endswith("['lr']")
    with np.load(fix("set.npz")) as z:
        images, labels = z["images"], z["labels"]
    np.savez(tmp_path / "nchw.npz", images=images.transpose(0, 3, 1, 2), labels=labels)
    nchw = run(tmp_path / "n.npz", "--format=npz", f"--npz={tmp_path / 'nchw.npz'}", "--lr=0.1",
               f"--dataset=npz:{toy_npz}")
    np.testing.assert_array_equal(nchw.images, dset.images)
    # Standardised with other constants: mapped back to pixels, then into this space.
    std = run(tmp_path / "s.npz", "--format=npz", f"--npz={fix('set.npz')}",
              f"--dataset=npz:{toy_npz}", "--space=standardised", "--source_mean=0.5",
              "--source_std=0.25")
    ds = toy_dataset(toy_npz)
    np.testing.assert_allclose(std.images, apply_preprocessing(images * 0.25 + 0.5,
                                                               ds.preprocessing), atol=1e-5)
    # 3x3x3 images: NHWC and NCHW both fit, so the layout must be said.
    cube = make_npz(tmp_path / "cube.npz", shape=(3, 3, 3), num_classes=2)
    np.savez(tmp_path / "c.npz", images=np.zeros((2, 3, 3, 3), np.float32), labels=[0, 1])
    flags = ["--format=npz", f"--npz={tmp_path / 'c.npz'}", "--lr=0.1", f"--dataset=npz:{cube}"]
    with pytest.raises(ValueError, match="--layout"):
        run(tmp_path / "c_out.npz", *flags)
    assert len(run(tmp_path / "c_out.npz", *flags, "--layout=nchw")) == 2


# ---- bad input: a clear ValueError naming the file and the field, nothing written -------------

def _bad_npz(tmp_path, **change):
    with np.load(fix("set.npz")) as z:
        arrays = {k: z[k] for k in z.files}
    arrays.update(change)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(tmp_path / "bad.npz", **arrays)
    return ["--format=npz", f"--npz={tmp_path / 'bad.npz'}"]


def _scaled(tmp_path, factor):
    """set.npz with its images multiplied by ``factor`` (finite in float32 up to ~3.4e38)."""
    with np.load(fix("set.npz")) as z:
        images = z["images"]
    return _bad_npz(tmp_path, images=(images * np.float32(factor)).astype(np.float32))


def _array_lr(tmp_path):
    """MTT flags with an lr file holding a (2,)*24 stride-0 bool view: 16M elements, every one of
    which numpy's repr would print (the error must describe it, not repr it)."""
    path = tmp_path / "lr.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("t/data.pkl", _tensor_pickle(numel=1, size=(2,) * 24, stride=(0,) * 24,
                                                stype=b"ctorch\nBoolStorage\n"))
        z.writestr("t/data/0", b"\x01")
    return MTT + [f"--lr_file={path}"]


_IMAGES = np.zeros((20, 8, 8, 1), np.float32)
_LABELS = np.repeat(np.arange(10), 2)
BAD = {
    "format": (lambda t: ["--format=dc", "--data=x.pt"], ["--format='dc'", "mtt|idc|npz"]),
    "npz as mtt": (lambda t: ["--format=mtt", f"--images={fix('set.npz')}",
                              f"--labels={fix('mtt_labels.pt')}", "--lr=1"],
                   ["set.npz", "not a torch.save file"]),
    "pt as npz": (lambda t: ["--format=npz", f"--npz={fix('mtt_images.pt')}"],
                  ["mtt_images.pt", "'images' and 'labels'"]),
    "legacy": (lambda t: MTT[:2] + [f"--labels={fix('legacy_labels.pt')}", "--lr=1"],
               ["legacy_labels.pt", "legacy torch.save"]),
    "rank": (lambda t: _bad_npz(t, images=_IMAGES[..., 0]), ["bad.npz", "rank 4"]),
    "channels": (lambda t: _bad_npz(t, images=np.zeros((20, 8, 8, 3), np.float32)),
                 ["bad.npz", "channel count"]),
    "size": (lambda t: _bad_npz(t, images=np.zeros((20, 6, 6, 1), np.float32)),
             ["bad.npz", "image size"]),
    "label range": (lambda t: _bad_npz(t, labels=_LABELS + 1), ["bad.npz", "labels", "outside"]),
    "empty class": (lambda t: _bad_npz(t, labels=_LABELS % 9), ["bad.npz", "[9] have no images"]),
    "nan": (lambda t: _bad_npz(t, images=np.where(_LABELS[:, None, None, None] == 3, np.nan,
                                                  _IMAGES).astype(np.float32)),
            ["bad.npz", "images contain NaN"]),
    "scaled": (lambda t: _scaled(t, 1e30), ["bad.npz", "reach |x| = ", "over 10000"]),
    "overflow": (lambda t: _scaled(t, 1e30) + ["--space=standardised", "--source_mean=0",
                                              "--source_std=1e10"],
                 ["bad.npz", "not finite in the dataset's input space"]),
    "factor": (lambda t: ["--format=idc", f"--data={fix('idc_data.pt')}", "--factor=3", "--lr=1"],
               ["idc_data.pt", "--factor=3 must divide"]),
    "lr zero": (lambda t: ["--format=idc", f"--data={fix('idc_data.pt')}", "--factor=1", "--lr=0"],
                ["--lr", "step size lr must be finite and > 0"]),
    "lr nan": (lambda t: _bad_npz(t, lr=np.float32(np.nan)), ["bad.npz", "['lr']", "finite"]),
    "lr array": (_array_lr, ["lr.pt", "'lr' must be a scalar float, got a bool array of shape"]),
    "lr twice": (lambda t: _bad_npz(t) + ["--lr=0.1"], ["bad.npz", "give one"]),
    "lr missing": (lambda t: MTT, ["--lr or --lr_file"]),
    "soft labels": (lambda t: MTT[:2] + [f"--labels={fix('soft_labels.pt')}", "--lr=1"],
                    ["soft_labels.pt", "soft labels", "integer"]),
    "float labels": (lambda t: _bad_npz(t, labels=_LABELS.astype(np.float32)),
                     ["bad.npz", "1-D integer"]),
    "preprocess": (lambda t: MTT + ["--lr=1", f"--config={ROOT}/configs/fashion_mnist.py:smoke",
                                    "--preprocess=zca"],
                   ["--preprocess='zca'", "data.preprocess='standard'", "fashion_mnist.py"]),
    "missing file": (lambda t: ["--format=mtt", "--images=/nonexistent/images_best.pt"],
                     ["--images=/nonexistent/images_best.pt", "no such file"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input(tmp_path, toy_npz, case):
    make_flags, needles = BAD[case]
    flags = list(make_flags(tmp_path))  # never extend the shared MTT list
    if not any(f.startswith("--config") for f in flags):
        flags.append(f"--dataset=npz:{toy_npz}")
    out = tmp_path / "out.npz"
    with pytest.raises(ValueError) as e:
        run(out, *flags)
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))
    assert not out.exists() and not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def test_main_exit_status(tmp_path, toy_npz, capsys):
    out = tmp_path / "d.npz"
    assert distill_tools.convert_main(["--format=npz", f"--npz={fix('set.npz')}", "--layout=bad",
                         f"--dataset=npz:{toy_npz}", f"--out={out}"]) == 2
    assert "--layout='bad' is invalid" in capsys.readouterr().err and not out.exists()
    assert distill_tools.convert_main(["--format=npz", f"--npz={fix('set.npz')}", f"--dataset=npz:{toy_npz}",
                         f"--out={out}"]) == 0
    assert "20 images" in capsys.readouterr().out and out.exists()


# ---- end to end: an imported set drives Distilled Pruning -------------------------------------

def test_imported_set_runs_distilled_pruning(tmp_path, toy_npz, tiny_config):
    from dp_jax.tasks import prune as experiment
    out = tmp_path / "distilled.npz"
    run(out, *MTT, f"--lr_file={fix('mtt_lr.pt')}", f"--dataset={tiny_config.data.name}")
    c = tiny_config
    c.distill.path = str(out)
    c.prune.method = "dp"
    c.prune.rounds = 1
    c.dp.steps = 10
    c.dp.batch_size = 10
    wd = str(tmp_path / "wd")
    experiment.run(c, wd)
    rows = [r for r in fileio.read_jsonl(os.path.join(wd, "rounds.jsonl")) if r["method"] == "dp"]
    assert sorted(r["round"] for r in rows) == [0, 1]
    assert [r["train_examples"] for r in sorted(rows, key=lambda r: r["round"])] == [0, 100]


def test_dp_jax_import_distilled_subcommand(tmp_path, toy_npz):
    import subprocess
    import sys
    out = tmp_path / "d.npz"
    cmd = [sys.executable, "-m", "dp_jax.cli", "import-distilled", "--format=idc",
           f"--data={fix('idc_data.pt')}", "--factor=2", "--lr=0.01",
           f"--dataset=npz:{toy_npz}", f"--out={out}"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "80 images (20 stored, factor 2)" in res.stdout
    assert load_distilled(str(out)).factor == 2
    bad = subprocess.run(cmd[:6] + ["--factor=3"] + cmd[7:], capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert bad.returncode == 2 and "factor" in bad.stderr
