"""Raw dataset sources: Fashion-MNIST IDX files, TFDS datasets and .npz files.

Each loader returns a ``RawData``: images NHWC in their stored dtype (uint8 pixels, or floats
taken to be in [0, 1]), integer labels and the number of classes. Checks that only make sense for
one source (IDX headers, npz keys, TFDS features) live here; the checks common to all sources are
in ``dp_jax.data.dataset``.
"""

from __future__ import annotations

import gzip
import math
import os
import pathlib
import zipfile
import zlib
from typing import Any, NamedTuple, Sequence

import numpy as np


class RawData(NamedTuple):
    """Unprocessed splits of one source; ``source`` names it in error messages."""
    source: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int


# ---------------------------------------------------------------------------------------------
# IDX (Fashion-MNIST)

IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension

FASHION_MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_NUM_CLASSES = 10
# Where the Debian package dataset-fashion-mnist installs the four .gz files.
FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
DATA_DIR_ENV = "DP_JAX_DATA_DIR"


def _read_bytes(path: pathlib.Path) -> bytes:
    """File contents, gunzipped when the file is gzip (by name or by magic bytes)."""
    raw = path.read_bytes()
    if path.suffix == ".gz" or raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise ValueError(f"{path}: truncated or corrupt gzip data ({e})") from e
    return raw


def read_idx(path: str | os.PathLike, expected_magic: int) -> np.ndarray:
    """Reads an unsigned-byte IDX file (plain or gzip) as a uint8 array.

    Raises ValueError naming the file for a wrong magic number or a size that disagrees with the
    header (truncated or trailing data).
    """
    path = pathlib.Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise ValueError(f"{path}: too short for an IDX header ({len(data)} bytes)")
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        raise ValueError(
            f"{path}: bad IDX magic number 0x{magic:08x}, expected 0x{expected_magic:08x} "
            "(not an IDX file of the expected kind)")
    ndim = expected_magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(data)} of {header} bytes)")
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    expected = math.prod(shape)
    found = len(data) - header
    if found < expected:
        raise ValueError(
            f"{path}: truncated IDX file: header declares shape {shape} ({expected} bytes of data) "
            f"but only {found} bytes follow")
    if found > expected:
        raise ValueError(
            f"{path}: IDX file has {found - expected} unexpected bytes after the {expected} bytes "
            f"declared by its header (shape {shape})")
    return np.frombuffer(data, np.uint8, count=expected, offset=header).reshape(shape)


def fashion_mnist_search_dirs(data_dir: str | None) -> list[pathlib.Path]:
    """Directories searched for the Fashion-MNIST IDX files, in order."""
    explicit = explicit_data_dir(data_dir)
    if explicit is not None:
        return [explicit]
    dirs = []
    cache = pathlib.Path.home() / ".cache" / "dp_jax"
    dirs += [cache, cache / "fashion_mnist", pathlib.Path(FASHION_MNIST_SYSTEM_DIR)]
    return dirs


def explicit_data_dir(data_dir: str | None) -> pathlib.Path | None:
    """The directory the user named (``data.data_dir``, else ``$DP_JAX_DATA_DIR``), if any."""
    chosen = data_dir or os.environ.get(DATA_DIR_ENV)
    return pathlib.Path(chosen).expanduser() if chosen else None


def _find_idx_files(directory: pathlib.Path) -> dict[str, pathlib.Path]:
    """The Fashion-MNIST files present in ``directory`` (plain preferred over .gz)."""
    found = {}
    for key, base in FASHION_MNIST_FILES.items():
        for name in (base, base + ".gz"):
            if (directory / name).is_file():
                found[key] = directory / name
                break
    return found


def load_fashion_mnist(data_dir: str | None = None) -> RawData:
    """Loads Fashion-MNIST from the first searched directory holding all four IDX files.

    Raises FileNotFoundError listing the directories searched and how to get the data.
    """
    searched = []
    explicit = explicit_data_dir(data_dir)
    for directory in fashion_mnist_search_dirs(data_dir):
        files = _find_idx_files(directory)
        if len(files) == len(FASHION_MNIST_FILES):
            break
        if explicit is not None:
            # A directory the user chose is never silently replaced by another copy.
            which = "data.data_dir" if data_dir else f"${DATA_DIR_ENV}"
            missing = [f"{b}[.gz]" for k, b in FASHION_MNIST_FILES.items() if k not in files]
            raise FileNotFoundError(
                f"{which}={directory} is incomplete: missing {', '.join(missing)}"
                + ("" if directory.is_dir() else " (the directory does not exist)")
                + f"; add the files or unset {which} to use the other copies")
        note = f" (has only {sorted(p.name for p in files.values())})" if files else ""
        searched.append(f"{directory}{note}")
    else:
        names = ", ".join(f"{b}[.gz]" for b in FASHION_MNIST_FILES.values())
        raise FileNotFoundError(
            "Fashion-MNIST IDX files not found. Looked for " + names + " in:\n  "
            + "\n  ".join(searched)
            + "\nGet the data in one of three ways:\n"
            "  1. apt-get install dataset-fashion-mnist (installs the files into "
            f"{FASHION_MNIST_SYSTEM_DIR});\n"
            "  2. load it through TFDS instead: --config.data.name=tfds:fashion_mnist;\n"
            f"  3. put the four IDX files (plain or .gz) in ${DATA_DIR_ENV} "
            "(or set data.data_dir).")
    arrays = {}
    for key, path in files.items():
        magic = IDX_IMAGES_MAGIC if key.startswith("x") else IDX_LABELS_MAGIC
        arrays[key] = read_idx(path, magic)
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.shape[0] != y.shape[0]:
            raise ValueError(
                f"{files['x_' + split]} holds {x.shape[0]} images but {files['y_' + split]} holds "
                f"{y.shape[0]} labels")
    return RawData(
        source=f"fashion_mnist ({directory})",
        x_train=arrays["x_train"][..., None], y_train=arrays["y_train"].astype(np.int64),
        x_test=arrays["x_test"][..., None], y_test=arrays["y_test"].astype(np.int64),
        num_classes=FASHION_MNIST_NUM_CLASSES)


# ---------------------------------------------------------------------------------------------
# .npz

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def load_npz(path: str | os.PathLike) -> RawData:
    """Loads ``x_train, y_train, x_test, y_test`` from an .npz file (no pickled objects).

    x is uint8 pixels (or any integer type in [0, 255]) or floats in [0, 1], NHWC or NHW (a channel
    axis is added); y is 1-D integer. num_classes is the largest label of either split plus one.
    """
    path = pathlib.Path(path).expanduser()
    source = f"npz:{os.path.abspath(path)}"
    if not path.is_file():
        raise FileNotFoundError(f"{source}: no such file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in NPZ_KEYS if k not in npz.files]
            if missing:
                raise ValueError(f"{source}: missing keys {missing} (has {sorted(npz.files)}; "
                                 f"needs {list(NPZ_KEYS)})")
            arrays = {k: npz[k] for k in NPZ_KEYS}
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ValueError(f"{source}: not a readable .npz file ({e})") from e
    except ValueError as e:
        if str(e).startswith(source):
            raise
        raise ValueError(f"{source}: cannot read arrays ({e})") from e
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim not in (3, 4):
            raise ValueError(f"{source}: x_{split} must be NHW or NHWC (3-D or 4-D), got shape "
                             f"{x.shape}")
        if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
            raise ValueError(f"{source}: x_{split} must be integer (pixels in [0, 255]) or float, "
                             f"got dtype {x.dtype}")
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"{source}: y_{split} must be a 1-D integer array, got shape "
                             f"{y.shape} dtype {y.dtype}")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{source}: x_{split} has {x.shape[0]} examples but y_{split} has "
                             f"{y.shape[0]} labels")
        if x.ndim == 3:
            arrays[f"x_{split}"] = x[..., None]
        if np.issubdtype(x.dtype, np.integer) and x.dtype != np.uint8 and x.size:
            if x.min() < 0 or x.max() > 255:
                raise ValueError(f"{source}: integer x_{split} must hold pixels in [0, 255], found "
                                 f"range [{x.min()}, {x.max()}]")
            arrays[f"x_{split}"] = arrays[f"x_{split}"].astype(np.uint8)
    labels = [arrays[k] for k in ("y_train", "y_test") if arrays[k].size]
    num_classes = int(max(int(y.max()) for y in labels)) + 1 if labels else 0
    return RawData(source=source, num_classes=num_classes,
                   **{k: arrays[k] if k.startswith("x") else arrays[k].astype(np.int64)
                      for k in NPZ_KEYS})


# ---------------------------------------------------------------------------------------------
# TFDS

# Records read per batched lookup; bounds the number of decoded examples held at once.
_TFDS_READ_CHUNK = 1024


def _read_examples(source: Any) -> list[dict]:
    """All examples of a TFDS data source, using batched reads where the source supports them."""
    n = len(source)
    out: list[dict] = []
    batched = hasattr(source, "__getitems__")
    for start in range(0, n, _TFDS_READ_CHUNK):
        keys = list(range(start, min(n, start + _TFDS_READ_CHUNK)))
        if batched:
            try:
                out.extend(source.__getitems__(keys))
                continue
            except TypeError:
                # Some sources (e.g. those of tfds.testing.mock_data) expose but do not implement
                # batched reads; read one record at a time instead.
                batched = False
        out.extend(source[i] for i in keys)
    return out


def _center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Centre-crops ``image`` (H, W, C) uint8 to a square and resizes it to ``size`` x ``size``."""
    from PIL import Image  # pylint: disable=import-outside-toplevel

    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = image[top:top + side, left:left + side]
    if side == size:
        return crop
    channels = crop.shape[2]
    planes = crop[..., 0] if channels == 1 else crop
    resized = np.asarray(Image.fromarray(planes).resize((size, size), Image.Resampling.BILINEAR))
    return resized.reshape(size, size, channels)


def _stack_images(examples: Sequence[dict], where: str, image_size: int | None) -> np.ndarray:
    """Stacks the ``image`` features, cropping/resizing when ``image_size`` is given."""
    images = [np.asarray(ex["image"]) for ex in examples]
    for im in images[:1]:
        if im.ndim != 3:
            raise ValueError(f"{where}: images must be (H, W, C), got shape {im.shape}")
        if im.dtype != np.uint8:
            raise ValueError(f"{where}: only uint8 images are supported, got dtype {im.dtype}")
    if image_size:
        images = [_center_crop_resize(im, image_size) for im in images]
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise ValueError(
            f"{where}: images have different shapes (e.g. {sorted(shapes)[:3]}); set "
            "data.image_size to centre-crop and resize them to a common square size")
    if not images:
        return np.zeros((0, 0, 0, 0), np.uint8)
    return np.stack(images)


def load_tfds(name: str, data_dir: str | None = None, image_size: int | None = None) -> RawData:
    """Loads the train and test (else validation) splits of a TFDS image-classification dataset.

    Reads through ``tfds.data_source`` (no TensorFlow needed; prepares/downloads the dataset into
    ``data_dir`` on first use) and materialises every example in memory. Images of varying size
    need ``image_size``: each is centre-cropped to a square and resized to ``image_size``.
    """
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    source = f"tfds:{name}" + (f" ({data_dir})" if data_dir else "")
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(f"{source}: no such TFDS dataset ({str(e).splitlines()[0]})") from e
    features = builder.info.features
    for key in ("image", "label"):
        if key not in features:
            raise ValueError(
                f"{source}: needs 'image' and 'label' features, has {sorted(features)}")
    num_classes = getattr(features["label"], "num_classes", None)
    if not num_classes:
        raise ValueError(f"{source}: the 'label' feature is not a ClassLabel with num_classes")

    splits = tfds.data_source(name, split=None, data_dir=data_dir)
    if splits:
        available = sorted(splits)
        test_split = next((s for s in ("test", "validation") if s in splits), None)
        if "train" not in splits or test_split is None:
            raise ValueError(f"{source}: needs a 'train' and a 'test' or 'validation' split, has "
                             f"{available}")
        train, test = splits["train"], splits[test_split]
    else:
        # Sources without split metadata (such as mocked ones) are asked for the splits by name.
        test_split = "test"
        train = tfds.data_source(name, split="train", data_dir=data_dir)
        test = tfds.data_source(name, split=test_split, data_dir=data_dir)

    arrays = {}
    for split, key, data in (("train", "train", train), (test_split, "test", test)):
        examples = _read_examples(data)
        where = f"{source} split {split!r}"
        arrays[f"x_{key}"] = _stack_images(examples, where, image_size)
        arrays[f"y_{key}"] = np.asarray([int(ex["label"]) for ex in examples], np.int64)
    if arrays["x_train"].size and arrays["x_test"].size:
        if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
            raise ValueError(
                f"{source}: train images {arrays['x_train'].shape[1:]} and {test_split} images "
                f"{arrays['x_test'].shape[1:]} differ in shape; set data.image_size")
    return RawData(source=source, num_classes=int(num_classes), **arrays)
