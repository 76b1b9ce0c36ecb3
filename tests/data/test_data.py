"""Tests for dp_jax.data: sources (IDX, npz, TFDS), validation, subsets and preprocessing."""

import gzip
import pathlib
import re

import numpy as np
import pytest

from dp_jax.data import Dataset, DataSpec, load_dataset, preprocess, sources, stratified_indices

DEBIAN_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")


def cfg(**kw):
    """A data spec; fields left out take their defaults."""
    return DataSpec.from_config(kw)


# ----------------------------------------------------------------------------------------------
# IDX helpers

def idx_bytes(array, magic):
    """Serialises a uint8 array as an IDX file body (big-endian header)."""
    array = np.asarray(array, np.uint8)
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def write_idx(path, array, magic, gz):
    """Writes an IDX file (gzip-compressed with a .gz suffix when ``gz``); returns its path."""
    data = idx_bytes(array, magic)
    path = pathlib.Path(str(path) + (".gz" if gz else ""))
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def make_fashion_dir(directory, n_train=40, n_test=20, size=6, gz=True, seed=0):
    """Writes four small Fashion-MNIST-style IDX files; returns the arrays written."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {
        "x_train": rng.integers(0, 256, (n_train, size, size), dtype=np.uint8),
        "y_train": np.arange(n_train) % 10,
        "x_test": rng.integers(0, 256, (n_test, size, size), dtype=np.uint8),
        "y_test": np.arange(n_test) % 10,
    }
    paths = {}
    for key, base in sources.FASHION_MNIST_FILES.items():
        magic = sources.IDX_IMAGES_MAGIC if key.startswith("x") else sources.IDX_LABELS_MAGIC
        paths[key] = write_idx(directory / base, arrays[key], magic, gz)
    return arrays, paths


@pytest.fixture
def no_system_data(tmp_path, monkeypatch):
    """Hides every default Fashion-MNIST location (home cache, env var, Debian directory)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(sources.DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(sources, "FASHION_MNIST_SYSTEM_DIR", str(tmp_path / "no_system_dir"))


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST

@pytest.mark.parametrize("gz", [False, True])
def test_fashion_mnist_from_data_dir(tmp_path, no_system_data, gz):
    arrays, _ = make_fashion_dir(tmp_path / "fm", gz=gz)
    ds = load_dataset(cfg(name="fashion_mnist", data_dir=str(tmp_path / "fm"), preprocess="none"),
                      seed=0)
    assert isinstance(ds, Dataset)
    assert ds.x_train.shape == (40, 6, 6, 1) and ds.x_test.shape == (20, 6, 6, 1)
    assert ds.image_shape == (6, 6, 1) and ds.num_classes == 10
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    np.testing.assert_allclose(ds.x_train[..., 0], arrays["x_train"] / 255.0, atol=1e-7)
    np.testing.assert_array_equal(ds.y_test, arrays["y_test"])
    assert ds.preprocessing == {"kind": "none", "mean": [0.0], "std": [1.0]}


def test_fashion_mnist_from_env_and_search_order(tmp_path, no_system_data, monkeypatch):
    make_fashion_dir(tmp_path / "env", n_train=30)
    monkeypatch.setenv("DP_JAX_DATA_DIR", str(tmp_path / "env"))
    assert load_dataset(cfg(name="fashion_mnist"), seed=0).x_train.shape[0] == 30
    # An explicit data_dir comes before the environment variable.
    make_fashion_dir(tmp_path / "explicit", n_train=50)
    ds = load_dataset(cfg(name="fashion_mnist", data_dir=str(tmp_path / "explicit")), seed=0)
    assert ds.x_train.shape[0] == 50


def test_fashion_mnist_from_home_cache_subdirectory(tmp_path, no_system_data):
    make_fashion_dir(tmp_path / "home" / ".cache" / "dp_jax" / "fashion_mnist", n_train=20)
    assert load_dataset(cfg(name="fashion_mnist"), seed=0).x_train.shape[0] == 20


def test_fashion_mnist_missing_lists_dirs_and_remedies(tmp_path, no_system_data):
    make_fashion_dir(tmp_path / "home" / ".cache" / "dp_jax" / "fashion_mnist" / "elsewhere")
    with pytest.raises(FileNotFoundError) as info:
        load_dataset(cfg(name="fashion_mnist"), seed=0)
    msg = str(info.value)
    for text in (str(tmp_path / "home" / ".cache" / "dp_jax"),
                 str(tmp_path / "no_system_dir"), "apt-get install dataset-fashion-mnist",
                 "--config.data.name=tfds:fashion_mnist", "$DP_JAX_DATA_DIR"):
        assert text in msg


@pytest.mark.parametrize("how", ["data_dir", "env"])
def test_an_explicit_incomplete_data_dir_is_an_error_not_a_fallback(tmp_path, no_system_data,
                                                                     monkeypatch, how):
    make_fashion_dir(tmp_path / "home" / ".cache" / "dp_jax", n_train=20)  # a complete copy
    partial = tmp_path / "partial"
    _, paths = make_fashion_dir(partial)
    paths["y_test"].unlink()
    kw = {}
    if how == "env":
        monkeypatch.setenv(sources.DATA_DIR_ENV, str(partial))
    else:
        kw["data_dir"] = str(partial)
    which = "data.data_dir" if how == "data_dir" else "$DP_JAX_DATA_DIR"
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(which)}=.*partial is incomplete: "
                       r"missing t10k-labels-idx1-ubyte\[\.gz\]"):
        load_dataset(cfg(name="fashion_mnist", **kw), seed=0)
    # Without it the complete copy is found, and where it came from is recorded.
    monkeypatch.delenv(sources.DATA_DIR_ENV, raising=False)
    ds = load_dataset(cfg(name="fashion_mnist"), seed=0)
    assert ds.x_train.shape[0] == 20
    assert ds.source == f"fashion_mnist ({tmp_path / 'home' / '.cache' / 'dp_jax'})"


def test_idx_bad_magic(tmp_path, no_system_data):
    _, paths = make_fashion_dir(tmp_path, gz=False)
    data = bytearray(paths["x_train"].read_bytes())
    data[3] = 0x01
    paths["x_train"].write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte: bad IDX magic number"):
        load_dataset(cfg(name="fashion_mnist", data_dir=str(tmp_path)), seed=0)


def test_idx_truncated_plain(tmp_path, no_system_data):
    _, paths = make_fashion_dir(tmp_path, gz=False)
    paths["x_test"].write_bytes(paths["x_test"].read_bytes()[:-7])
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte: truncated IDX file"):
        load_dataset(cfg(name="fashion_mnist", data_dir=str(tmp_path)), seed=0)


def test_idx_trailing_bytes(tmp_path, no_system_data):
    _, paths = make_fashion_dir(tmp_path, gz=False)
    paths["y_train"].write_bytes(paths["y_train"].read_bytes() + b"\0\0")
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte: IDX file has 2 unexpected"):
        load_dataset(cfg(name="fashion_mnist", data_dir=str(tmp_path)), seed=0)


def test_idx_truncated_gzip(tmp_path, no_system_data):
    _, paths = make_fashion_dir(tmp_path, gz=True)
    raw = paths["x_train"].read_bytes()
    paths["x_train"].write_bytes(raw[:len(raw) // 2])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.gz: truncated or corrupt gzip"):
        load_dataset(cfg(name="fashion_mnist", data_dir=str(tmp_path)), seed=0)


def test_idx_corrupt_gzip(tmp_path, no_system_data):
    _, paths = make_fashion_dir(tmp_path, gz=True)
    raw = bytearray(paths["x_test"].read_bytes())
    for i in range(20, len(raw) - 10):
        raw[i] ^= 0xFF
    paths["x_test"].write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte.gz: truncated or corrupt gzip"):
        load_dataset(cfg(name="fashion_mnist", data_dir=str(tmp_path)), seed=0)


def test_idx_count_mismatch(tmp_path, no_system_data):
    _, paths = make_fashion_dir(tmp_path, gz=False)
    write_idx(paths["y_train"], np.zeros(39), sources.IDX_LABELS_MAGIC, gz=False)
    with pytest.raises(ValueError, match=r"holds 40 images but .*train-labels-idx1-ubyte holds 39"):
        load_dataset(cfg(name="fashion_mnist", data_dir=str(tmp_path)), seed=0)


def test_fashion_mnist_label_out_of_range(tmp_path, no_system_data):
    _, paths = make_fashion_dir(tmp_path, gz=False)
    write_idx(paths["y_test"], np.full(20, 10), sources.IDX_LABELS_MAGIC, gz=False)
    with pytest.raises(ValueError, match=r"test labels must lie in \[0, 10\)"):
        load_dataset(cfg(name="fashion_mnist", data_dir=str(tmp_path)), seed=0)


@pytest.mark.skipif(not (DEBIAN_DIR / "train-images-idx3-ubyte.gz").exists(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist_debian_files():
    ds = load_dataset(cfg(name="fashion_mnist", data_dir=str(DEBIAN_DIR)), seed=0)
    assert ds.x_train.shape == (60000, 28, 28, 1) and ds.x_test.shape == (10000, 28, 28, 1)
    assert ds.image_shape == (28, 28, 1) and ds.num_classes == 10
    np.testing.assert_array_equal(np.bincount(ds.y_train), [6000] * 10)
    assert ds.y_test.min() == 0 and ds.y_test.max() == 9
    assert abs(float(ds.x_train.mean())) < 1e-4
    assert abs(float(ds.x_train.std()) - 1.0) < 1e-4
    assert ds.preprocessing["kind"] == "standard"
    np.testing.assert_allclose(ds.preprocessing["mean"], [0.2860], atol=1e-4)


# ----------------------------------------------------------------------------------------------
# npz

def write_npz(path, **overrides):
    """Writes a small 5-class npz dataset; ``overrides`` replace arrays (None drops a key)."""
    rng = np.random.default_rng(1)
    arrays = {
        "x_train": rng.integers(0, 256, (60, 4, 4, 3), dtype=np.uint8),
        "y_train": np.arange(60) % 5,
        "x_test": rng.integers(0, 256, (15, 4, 4, 3), dtype=np.uint8),
        "y_test": np.arange(15) % 5,
    }
    arrays.update(overrides)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return arrays


def test_npz_uint8_nhwc(tmp_path):
    arrays = write_npz(tmp_path / "d.npz")
    ds = load_dataset(cfg(name=f"npz:{tmp_path / 'd.npz'}", preprocess="none"), seed=0)
    assert ds.num_classes == 5 and ds.image_shape == (4, 4, 3)
    np.testing.assert_allclose(ds.x_test, arrays["x_test"] / 255.0, atol=1e-7)
    assert ds.name == f"npz:{tmp_path / 'd.npz'}"


def test_npz_float_nhw_gets_channel_axis(tmp_path):
    rng = np.random.default_rng(2)
    x_train = rng.random((30, 5, 5)).astype(np.float64)
    write_npz(tmp_path / "f.npz", x_train=x_train, y_train=np.arange(30) % 3,
              x_test=rng.random((6, 5, 5)), y_test=np.arange(6) % 3)
    ds = load_dataset(cfg(name=f"npz:{tmp_path / 'f.npz'}", preprocess="none"), seed=0)
    assert ds.x_train.shape == (30, 5, 5, 1) and ds.x_train.dtype == np.float32
    assert ds.num_classes == 3
    np.testing.assert_allclose(ds.x_train[..., 0], x_train, atol=1e-7)


@pytest.mark.parametrize("overrides, match", [
    ({"y_test": None}, r"missing keys \['y_test'\]"),
    ({"x_train": np.zeros((60, 48), np.uint8)}, "x_train must be NHW or NHWC"),
    ({"x_test": np.zeros((15, 1, 4, 4, 3), np.uint8)}, "x_test must be NHW or NHWC"),
    ({"y_train": np.zeros((60, 1), np.int64)}, "y_train must be a 1-D integer array"),
    ({"y_test": np.zeros(15, np.float32)}, "y_test must be a 1-D integer array"),
    ({"y_train": np.zeros(59, np.int64)}, "x_train has 60 examples but y_train has 59"),
    ({"y_train": np.arange(60) % 5 - 1}, r"train labels must lie in \[0, 5\)"),
    ({"x_train": np.full((60, 4, 4, 3), np.nan, np.float32)}, "x_train contains NaN or inf"),
    ({"x_test": np.full((15, 4, 4, 3), np.inf)}, "x_test contains NaN or inf"),
    ({"x_test": np.zeros((0, 4, 4, 3), np.uint8), "y_test": np.zeros(0, np.int64)},
     "the test split is empty"),
    ({"x_test": np.zeros((15, 5, 5, 3), np.uint8)}, "differ in shape"),
    ({"x_train": np.full((60, 4, 4, 3), 300, np.int32)}, r"must hold pixels in \[0, 255\]"),
])
def test_npz_validation(tmp_path, overrides, match):
    path = tmp_path / "bad.npz"
    write_npz(path, **overrides)
    with pytest.raises(ValueError, match=match) as info:
        load_dataset(cfg(name=f"npz:{path}"), seed=0)
    assert str(path) in str(info.value)


def test_npz_object_arrays_are_refused(tmp_path):
    path = tmp_path / "obj.npz"
    write_npz(path, y_test=np.array([1, "a"] * 7 + [2], dtype=object))
    with pytest.raises(ValueError, match=str(path)):
        load_dataset(cfg(name=f"npz:{path}"), seed=0)


def test_npz_not_a_zip_and_missing_file(tmp_path):
    path = tmp_path / "junk.npz"
    path.write_bytes(b"not a zip archive")
    with pytest.raises(ValueError, match="junk.npz"):
        load_dataset(cfg(name=f"npz:{path}"), seed=0)
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        load_dataset(cfg(name=f"npz:{tmp_path / 'nope.npz'}"), seed=0)


# ----------------------------------------------------------------------------------------------
# Config errors

def test_unknown_name_lists_allowed_forms():
    allowed = r"allowed: fashion_mnist \| tfds:<name> \| npz:<path>"
    with pytest.raises(ValueError, match=r"data.name='mnist' is invalid; " + allowed):
        load_dataset(cfg(name="mnist"), seed=0)
    for name in ("tfds:", "npz", "fashion_mnist:x"):  # a scheme needs its argument, a name none
        with pytest.raises(ValueError, match=r"data.name=.* is invalid; " + allowed):
            load_dataset(cfg(name=name), seed=0)


def test_unknown_preprocess(tmp_path):
    write_npz(tmp_path / "d.npz")
    with pytest.raises(ValueError, match=r"unknown preprocess 'minmax'"):
        load_dataset(cfg(name=f"npz:{tmp_path / 'd.npz'}", preprocess="minmax"), seed=0)


@pytest.mark.parametrize("size, match", [
    (61, r"train_size=61 exceeds the 60 examples"),
    (4, r"train_size=4 is smaller than num_classes=5"),
    (-1, r"train_size must be >= 0"),
])
def test_train_size_errors(tmp_path, size, match):
    write_npz(tmp_path / "d.npz")
    with pytest.raises(ValueError, match=match):
        load_dataset(cfg(name=f"npz:{tmp_path / 'd.npz'}", train_size=size), seed=0)


def test_image_size_only_for_tfds(tmp_path):
    write_npz(tmp_path / "d.npz")
    with pytest.raises(ValueError, match=r"image_size is invalid with data.name='npz:.*"
                       r"allowed: unset, or a source that resizes \(tfds:<name>\)"):
        load_dataset(cfg(name=f"npz:{tmp_path / 'd.npz'}", image_size=8), seed=0)


# ----------------------------------------------------------------------------------------------
# Stratified subsets

def test_stratified_subset_counts_and_seeds(tmp_path):
    rng = np.random.default_rng(3)
    y_train = rng.permutation(np.arange(200) % 5)
    write_npz(tmp_path / "s.npz", x_train=rng.integers(0, 256, (200, 4, 4, 3), dtype=np.uint8),
              y_train=y_train)
    name = f"npz:{tmp_path / 's.npz'}"

    ds = load_dataset(cfg(name=name, train_size=23), seed=7)
    np.testing.assert_array_equal(np.bincount(ds.y_train, minlength=5), [5, 5, 5, 4, 4])
    again = load_dataset(cfg(name=name, train_size=23), seed=7)
    np.testing.assert_array_equal(ds.x_train, again.x_train)
    other = load_dataset(cfg(name=name, train_size=23), seed=8)
    assert not np.array_equal(ds.x_train, other.x_train)
    # The test split is never subset, and preprocessing is fitted on the subset.
    assert ds.x_test.shape[0] == 15
    np.testing.assert_allclose(ds.x_train.reshape(-1, 3).mean(0), 0, atol=1e-5)


def test_stratified_indices_redistributes_small_classes():
    labels = np.array([0] * 2 + [1] * 50 + [2] * 50 + [3] * 50)
    idx = stratified_indices(labels, 21, num_classes=4, seed=0)
    assert len(np.unique(idx)) == 21 and np.all(np.diff(idx) > 0)
    # Class 0 gives its 2; the other 19 split 7/6/6 (remainder to the lowest class index).
    np.testing.assert_array_equal(np.bincount(labels[idx], minlength=4), [2, 7, 6, 6])
    # A class absent from the labels takes nothing.
    idx = stratified_indices(labels[2:], 9, num_classes=4, seed=0)
    np.testing.assert_array_equal(np.bincount(labels[2:][idx], minlength=4), [0, 3, 3, 3])


# ----------------------------------------------------------------------------------------------
# Preprocessing through load_dataset

@pytest.mark.parametrize("kind", ["standard", "zca"])
def test_to_pixels_recovers_loaded_pixels(tmp_path, kind):
    rng = np.random.default_rng(4)
    x_train = rng.integers(0, 256, (120, 4, 4, 3), dtype=np.uint8)
    arrays = write_npz(tmp_path / "p.npz", x_train=x_train, y_train=np.arange(120) % 5)
    ds = load_dataset(cfg(name=f"npz:{tmp_path / 'p.npz'}", preprocess=kind, zca_eps=0.05),
                      seed=0)
    assert ds.preprocessing["kind"] == kind
    if kind == "zca":
        assert ds.preprocessing["zca_eps"] == 0.05
        assert ds.preprocessing["zca_W"].shape == (48, 48)
    np.testing.assert_allclose(preprocess.to_pixels(ds.x_train, ds.preprocessing),
                               arrays["x_train"] / 255.0, atol=1e-4)
    np.testing.assert_allclose(preprocess.to_pixels(ds.x_test, ds.preprocessing),
                               arrays["x_test"] / 255.0, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# TFDS (mocked: never downloads)

def test_tfds_cifar10_mock():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=30):
        ds = load_dataset(cfg(name="tfds:cifar10"), seed=0)
    assert ds.x_train.shape == (30, 32, 32, 3) and ds.x_test.shape == (30, 32, 32, 3)
    assert ds.num_classes == 10 and ds.image_shape == (32, 32, 3)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    assert ds.y_train.min() >= 0 and ds.y_train.max() < 10
    np.testing.assert_allclose(ds.x_train.reshape(-1, 3).mean(0), 0, atol=1e-4)


def test_tfds_variable_size_images_need_image_size():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=6):
        with pytest.raises(ValueError,
                           match=r"tfds:imagenette/160px .*different shapes.*image_size"):
            load_dataset(cfg(name="tfds:imagenette/160px"), seed=0)
        ds = load_dataset(cfg(name="tfds:imagenette/160px", image_size=8), seed=0)
    assert ds.x_train.shape == (6, 8, 8, 3) and ds.num_classes == 10


def test_tfds_falls_back_to_validation_split(monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    rng = np.random.default_rng(5)

    def split(n):
        """n fake TFDS examples."""
        return [{"image": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
                 "label": np.int64(i % 10)} for i in range(n)]

    fake = {"train": split(12), "validation": split(4)}
    with tfds.testing.mock_data(num_examples=1):
        monkeypatch.setattr(tfds, "data_source",
                            lambda name, split=None, data_dir=None: fake if split is None
                            else fake[split])
        ds = load_dataset(cfg(name="tfds:cifar10", preprocess="none"), seed=0)
        assert ds.x_train.shape[0] == 12 and ds.x_test.shape[0] == 4
        np.testing.assert_allclose(ds.x_test[0], fake["validation"][0]["image"] / 255.0, atol=1e-7)

        fake.pop("validation")
        with pytest.raises(ValueError, match=r"tfds:cifar10: needs a 'train' and a 'test' or "
                           r"'validation' split"):
            load_dataset(cfg(name="tfds:cifar10"), seed=0)


def test_tfds_label_out_of_metadata_range(monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    image = np.zeros((32, 32, 3), np.uint8)
    fake = {"train": [{"image": image, "label": 12}] * 3, "test": [{"image": image, "label": 0}]}
    with tfds.testing.mock_data(num_examples=1):
        monkeypatch.setattr(tfds, "data_source",
                            lambda name, split=None, data_dir=None: fake)
        with pytest.raises(ValueError, match=r"tfds:cifar10: train labels must lie in \[0, 10\)"):
            load_dataset(cfg(name="tfds:cifar10"), seed=0)


def test_tfds_unknown_dataset():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=1):
        with pytest.raises(ValueError, match="tfds:no_such_dataset_xyz: no such TFDS dataset"):
            load_dataset(cfg(name="tfds:no_such_dataset_xyz"), seed=0)


# ----------------------------------------------------------------------------------------------
# The source registry

def test_a_registered_source_is_loaded_and_validated_like_a_builtin(tmp_path):
    """A source added from outside the package loads through load_dataset, its arrays pass the
    same checks as a built-in source's, and its name may not be registered twice."""
    from dp_jax.data import RawData, Source, registry

    calls = []

    def load_bands(arg, spec):
        calls.append((arg, spec.train_size))
        rng = np.random.default_rng(int(arg))
        y = np.arange(40) % 4
        x = (rng.uniform(0, 1, (40, 6, 6, 1)) * 0.2 + y[:, None, None, None] / 5).astype("float32")
        return RawData(f"bands:{arg}", x, y, x[:12], y[:12], num_classes=4)

    registry.register(Source("bands", load_bands, form="bands:<seed>", takes_arg=True))
    try:
        ds = load_dataset(cfg(name="bands:3", train_size=20), seed=0)
        assert calls == [("3", 20)]
        assert ds.num_classes == 4 and len(ds.y_train) == 20
        assert np.bincount(ds.y_train).tolist() == [5, 5, 5, 5]  # stratified like any source
        with pytest.raises(ValueError, match="already registered"):
            registry.register(Source("bands", load_bands, takes_arg=True))
        with pytest.raises(ValueError, match="already registered.*built in"):
            registry.register(Source("npz", load_bands, takes_arg=True))
        with pytest.raises(ValueError, match=r"allowed: .*bands:<seed>"):
            load_dataset(cfg(name="bandz:1"), seed=0)
    finally:
        registry.SOURCES.pop("bands")


def test_a_registered_source_gets_the_common_checks():
    from dp_jax.data import RawData, Source, registry

    def bad(arg, spec):  # labels outside [0, classes)
        x = np.zeros((8, 4, 4, 1), np.uint8)
        return RawData("bad", x, np.arange(8) % 3 + 1, x, np.arange(8) % 3, num_classes=3)

    registry.register(Source("badlabels", bad))
    try:
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
            load_dataset(cfg(name="badlabels"), seed=0)
    finally:
        registry.SOURCES.pop("badlabels")
