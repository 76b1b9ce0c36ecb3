r"""Import distilled sets made by other code (MTT, IDC, plain npz) as a validated distilled.npz.

  python -m dp_jax.distill.convert --format=mtt --images=images_best.pt --labels=labels_best.pt \
      --lr=0.01 --dataset=tfds:cifar10 --preprocess=zca --out=distilled.npz
  python -m dp_jax.distill.convert --format=idc --data=data.pt --factor=2 --lr=0.01 \
      --dataset=fashion_mnist --out=distilled.npz
  python -m dp_jax.distill.convert --format=npz --npz=set.npz --dataset=npz:toy.npz --out=d.npz

The set is put in the input space of ``--dataset`` as ``dp_jax.data.load_dataset`` loads it
with ``--preprocess/--zca_eps/--train_size/--seed``, or with those of ``--config`` (an experiment
config ``path[:variant]``; flags disagreeing with it are refused), so the stored preprocessing is
the one that experiment fits. ``--space`` says where the source images live: ``model`` (that
space already; MTT's default), ``pixels`` ([0, 1]; IDC's default) or ``standardised`` (``(x -
source_mean) / source_std``, e.g. MTT's fixed CIFAR-10 constants); the last two are mapped
through the dataset's preprocessing. ``.pt`` tensors (NCHW) are read by ``torch_pickle``: no
torch, no code execution. Soft labels (float N x K, as DATM stores) are refused: the DP inner
loop trains on integer labels. All checks run before anything is written (ValueError naming the
file and the field); provenance goes into the set's ``meta['provenance']``.
"""

from __future__ import annotations

import datetime
import hashlib
import math
import os
import zipfile

import numpy as np

from dp_jax.config import files as config_files
from dp_jax.data import describe_preprocessing, load_dataset
from dp_jax.data import preprocess as pre
from dp_jax.data.spec import DataSpec
from dp_jax.distill import sets as dist_lib
from dp_jax.distill import torch_pickle
from dp_jax.distill.safe_unpickler import LimitError

FORMATS = ("mtt", "idc", "npz")
SPACES = ("model", "pixels", "standardised")
LAYOUTS = ("auto", "nhwc", "nchw")
# flag -> (field of an experiment config, default without --config)
DATA_FLAGS = {"dataset": ("data.name", None), "preprocess": ("data.preprocess", "standard"),
              "zca_eps": ("data.zca_eps", 0.1), "train_size": ("data.train_size", 0),
              "data_dir": ("data.data_dir", None), "image_size": ("data.image_size", None),
              "seed": ("seed", 0)}


# The data fields a converted set records (its provenance).
_DATA_FIELDS = ("name", "data_dir", "train_size", "preprocess", "zca_eps", "image_size")

def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of PyTorch's bilinear resize, align_corners=False: source coordinate
    ``(dst + 0.5) * n_in / n_out - 0.5`` clamped at 0, upper neighbour clamped to the last pixel."""
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = src - i0
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.arange(n_out), i0), 1.0 - lam)
    np.add.at(m, (np.arange(n_out), i1), lam)
    return m


def idc_decode(images: np.ndarray, labels: np.ndarray, factor: int):
    """IDC's uniform multi-formation (``decode_zoom``) on NHWC images, in NumPy.

    Every run of consecutive equal labels (IDC decodes class by class) is cut into f x f crops,
    crop (i, j) = rows i*s..(i+1)*s, columns j*s..(j+1)*s with s = H/f, taken in row-major order;
    the crops are concatenated crop-major (all images' crop (0,0), then crop (0,1), ...), each
    upsampled to H x W with bilinear, align_corners=False; the run's labels are tiled f*f times.
    """
    n, h, w, c = images.shape
    if factor == 1:
        return images, labels
    s = h // factor
    mh, mw = _resize_matrix(s, h), _resize_matrix(s, w)
    starts = np.flatnonzero(np.r_[True, labels[1:] != labels[:-1]])
    xs, ys = [], []
    for a, b in zip(starts, np.r_[starts[1:], n]):
        x = images[a:b].astype(np.float64)
        crops = np.concatenate([x[:, i * s:(i + 1) * s, j * s:(j + 1) * s]
                                for i in range(factor) for j in range(factor)])
        up = np.einsum("ph,nhwc->npwc", mh, crops)
        xs.append(np.einsum("qw,npwc->npqc", mw, up).astype(np.float32))
        ys.append(np.tile(labels[a:b], factor * factor))
    return np.concatenate(xs), np.concatenate(ys)


def _file(args, flag: str) -> str:
    path = getattr(args, flag)
    if not path:
        raise ValueError(f"--format={args.format} needs --{flag}")
    if not os.path.isfile(path):
        raise ValueError(f"--{flag}={path}: no such file")
    return path


def _describe(x) -> str:
    """What ``x`` is, in bounded time (numpy prints every element of e.g. a (2,)*30 array)."""
    if isinstance(x, np.ndarray):
        return f"a {x.dtype} array of shape {x.shape}"
    if isinstance(x, float) or (isinstance(x, int) and x.bit_length() <= 64):
        return repr(x)
    return f"a {type(x).__name__}"


def _read_mtt(args) -> dict:
    """MTT: images_*.pt and labels_*.pt, optionally synthetic_lr as its own .pt."""
    images_path, labels_path = _file(args, "images"), _file(args, "labels")
    src = {"images": torch_pickle.load_arrays(images_path, "images")[0],
           "labels": torch_pickle.load_arrays(labels_path, "labels")[0],
           "images_from": images_path, "labels_from": labels_path,
           "layout": "nchw", "files": {"images": images_path, "labels": labels_path}}
    if args.lr_file:
        lr_path = _file(args, "lr_file")
        lr = torch_pickle.load(lr_path)
        if isinstance(lr, np.ndarray) and lr.size == 1 and lr.dtype.kind == "f":
            lr = float(lr.reshape(()))
        if not isinstance(lr, float):
            raise ValueError(f"{lr_path}: 'lr' must be a scalar float, got {_describe(lr)}")
        src.update(lr=lr, lr_from=f"file {lr_path}")
        src["files"]["lr"] = lr_path
    return src


def _read_idc(args) -> dict:
    """IDC: condense.py's ``torch.save([synset.data, synset.targets], 'data.pt')``."""
    path = _file(args, "data")
    images, labels = torch_pickle.load_arrays(path, "data", "target")
    return {"images": images, "labels": labels, "images_from": f"{path} [0] (data)",
            "labels_from": f"{path} [1] (target)", "layout": "nchw", "files": {"data": path}}


def _npz_member(z: zipfile.ZipFile, name: str, path: str, used: int):
    """An npz member as an array, bounded like a .pt file (``torch_pickle.Limits``; ``used``: bytes
    of the file's arrays read so far): its declared size, then its header's shape x itemsize are
    checked before anything is inflated, and no more than the header's bytes are read."""
    limits, info = torch_pickle.Limits.default(), z.getinfo(name)
    room = limits.tensor_bytes + (1 << 16)  # the .npy header takes at most 10000 bytes
    if info.file_size > room:
        raise LimitError(f"{path}: refused: {name} declares {info.file_size} bytes, over "
                         f"MAX_TENSOR_BYTES = {limits.tensor_bytes} (+ 64 KiB of header)")
    with z.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f"{name}: .npy format version {version} is not supported")
        shape, _, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0) else
                           np.lib.format.read_array_header_2_0(f))
        if dtype.hasobject or any(n < 0 for n in shape):
            raise ValueError(f"{name}: refused: {dtype} array of shape {shape} (object arrays "
                             "would be unpickled)")
        nbytes = math.prod(shape) * dtype.itemsize
        for need, limit, limit_name in ((nbytes, limits.tensor_bytes, "MAX_TENSOR_BYTES"),
                                        (used + nbytes, limits.total_bytes, "MAX_TOTAL_BYTES")):
            if need > limit:
                raise LimitError(f"{path}: refused: {name} (shape {shape}, {dtype}) brings the "
                                 f"arrays read to {need} bytes, over {limit_name} = {limit}")
        f.seek(0)  # read_array parses the checked header again, then reads exactly nbytes
        return np.lib.format.read_array(f, allow_pickle=False), nbytes


def _read_npz(args) -> dict:
    """A plain npz: images, labels, optional lr (never unpickles: object arrays are refused;
    bounded by :func:`_npz_member`)."""
    path, arrays, used = _file(args, "npz"), {}, 0
    try:
        with zipfile.ZipFile(path) as z:
            members = {n[:-4] if n.endswith(".npy") else n: n for n in z.namelist()}
            for key in ("images", "labels", "lr"):
                if key in members:
                    arrays[key], nbytes = _npz_member(z, members[key], path, used)
                    used += nbytes
    except LimitError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable .npz file ({e})") from e
    if "images" not in arrays or "labels" not in arrays:
        raise ValueError(f"{path}: an npz source needs arrays 'images' and 'labels' (optional "
                         f"'lr'); has {sorted(members)}")
    src = {"images": arrays["images"], "labels": arrays["labels"], "layout": args.layout,
           "images_from": f"{path} ['images']", "labels_from": f"{path} ['labels']",
           "files": {"npz": path}}
    if "lr" in arrays:
        if arrays["lr"].size != 1 or arrays["lr"].dtype.kind != "f":
            raise ValueError(f"{path}: 'lr' must be a float scalar, got "
                             f"{_describe(arrays['lr'])}")
        src.update(lr=float(arrays["lr"].reshape(())), lr_from=f"{path} ['lr']")
    return src


READERS = {"mtt": _read_mtt, "idc": _read_idc, "npz": _read_npz}


def _data_settings(args):
    """The data config (and seed) the set must match: flags, or --config with flags agreeing."""
    given = {k: getattr(args, k) for k in DATA_FLAGS if getattr(args, k) is not None}
    if not args.config:
        vals = {k: given.get(k, default) for k, (_, default) in DATA_FLAGS.items()}
        if vals["dataset"] is None:
            raise ValueError("--dataset (or --config) is required: the set must be placed in "
                             "an experiment's input space")
    else:
        cfg = config_files.load_config(args.config)
        vals = {}
        for k, (field, _) in DATA_FLAGS.items():
            obj = cfg
            for part in field.split("."):
                obj = getattr(obj, part, None)
            vals[k] = obj
            if k in given and given[k] != obj:
                raise ValueError(f"--{k}={given[k]!r} differs from {field}={obj!r} of the "
                                 f"experiment config {args.config}: the set must live in the "
                                 "input space that experiment uses")
    if vals["preprocess"] not in pre.PREPROCESS_KINDS:
        raise ValueError(f"--preprocess={vals['preprocess']!r} is invalid; allowed: "
                         + "|".join(pre.PREPROCESS_KINDS))
    data = DataSpec.from_config(name=vals["dataset"], data_dir=vals["data_dir"],
                                train_size=vals["train_size"], preprocess=vals["preprocess"],
                                zca_eps=vals["zca_eps"], image_size=vals["image_size"])
    return data, int(vals["seed"])


def _to_nhwc(images: np.ndarray, layout: str, shape: tuple, where: str) -> np.ndarray:
    """Float32 NHWC images of the dataset's (H, W, C); NCHW detected only when unambiguous."""
    h, w, c = shape
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"{where}: images must have rank 4 (N, C, H, W or N, H, W, C) with N > 0,"
                         f" got shape {images.shape}")
    if images.dtype.kind != "f":
        raise ValueError(f"{where}: images must be floats, got dtype {images.dtype}")
    fits = {"nhwc": images.shape[1:] == (h, w, c), "nchw": images.shape[1:] == (c, h, w)}
    if layout == "auto":
        if fits["nhwc"] and fits["nchw"]:
            raise ValueError(f"{where}: images {images.shape} fit both NHWC and NCHW for "
                             f"(H, W, C) = {shape}; say which with --layout=nhwc|nchw")
        layout = "nhwc" if fits["nhwc"] else "nchw"
    if not fits[layout]:
        raise ValueError(f"{where}: images have shape {images.shape} ({layout.upper()}), but "
                         f"the dataset's images are (H, W, C) = {shape}: wrong channel count or "
                         "image size")
    x = images if layout == "nhwc" else images.transpose(0, 2, 3, 1)
    x = np.ascontiguousarray(x, np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"{where}: images contain NaN or inf")
    return x


def _labels(labels: np.ndarray, n: int, num_classes: int, where: str) -> np.ndarray:
    """Int32 hard labels: one per image, every class present, all within [0, num_classes)."""
    if labels.ndim == 2 and labels.dtype.kind == "f":
        raise ValueError(f"{where}: labels are a float {labels.shape} tensor, i.e. soft labels "
                         "(as DATM stores); not supported: the DP inner loop trains on integer "
                         "class labels")
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ValueError(f"{where}: labels must be a 1-D integer tensor, got dtype {labels.dtype} "
                         f"shape {labels.shape}")
    if labels.shape[0] != n:
        raise ValueError(f"{where}: {labels.shape[0]} labels for {n} images")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"{where}: labels range [{labels.min()}, {labels.max()}] lies outside "
                         f"the dataset's {num_classes} classes")
    empty = np.flatnonzero(np.bincount(labels, minlength=num_classes) == 0)
    if empty.size:
        raise ValueError(f"{where}: labels: classes {empty.tolist()} have no images")
    return labels.astype(np.int32)


def _step_size(args, src: dict):
    """(lr, where it came from): exactly one of the source and --lr."""
    if "lr" in src and args.lr is not None:
        raise ValueError(f"--lr={args.lr} given but {src['lr_from']} holds a step size too; "
                         "give one")
    lr, origin = (src["lr"], src["lr_from"]) if "lr" in src else (args.lr, "flag --lr")
    if lr is None:
        raise ValueError(f"--format={args.format}: the source holds no step size; give --lr"
                         + (" or --lr_file" if args.format == "mtt" else ""))
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"{origin}: step size lr must be finite and > 0, got {lr}")
    return float(lr), origin


def _check_flags(args) -> None:
    """Flag checks that need no file: format, factor, space, layout."""
    if args.format not in FORMATS:
        raise ValueError(f"--format={args.format!r} is invalid; allowed: {'|'.join(FORMATS)}")
    if args.format == "idc" and args.factor is None:
        raise ValueError("--format=idc needs --factor (IDC's multi-formation factor; 1 = none)")
    if args.factor is not None and (args.factor < 1 or (args.format != "idc" and args.factor != 1)):
        raise ValueError(f"--factor={args.factor} is invalid: a positive integer, for --format=idc")
    args.space = args.space or ("pixels" if args.format == "idc" else "model")
    if args.space not in SPACES:
        raise ValueError(f"--space={args.space!r} is invalid; allowed: {'|'.join(SPACES)}")
    if (args.space == "standardised") != bool(args.source_mean and args.source_std):
        raise ValueError("--source_mean and --source_std go together with --space=standardised")
    if args.layout not in LAYOUTS:
        raise ValueError(f"--layout={args.layout!r} is invalid; allowed: {'|'.join(LAYOUTS)}")


def _floats(args, flag: str, n: int) -> np.ndarray:
    try:
        v = np.array([float(t) for t in getattr(args, flag).split(",")], np.float32)
    except ValueError as e:
        raise ValueError(f"--{flag}: not comma-separated numbers ({e})") from e
    if v.shape != (n,) or not np.isfinite(v).all():
        raise ValueError(f"--{flag}: needs {n} finite values (one per channel), got {v.tolist()}")
    return v


def _to_model_space(x: np.ndarray, args, prep: dict) -> np.ndarray:
    """Source space -> the dataset's model input space."""
    if args.space == "model":
        return x
    if args.space == "standardised":
        stats = [_floats(args, flag, x.shape[-1]) for flag in ("source_mean", "source_std")]
        if (stats[1] <= 0).any():
            raise ValueError(f"--source_std: values must be > 0, got {stats[1].tolist()}")
        x = pre.invert_standard(x, *stats)
    return pre.apply_preprocessing(x, prep)


# Largest |x| accepted in model space. The preprocessings map [0, 1] pixels to (x - mean) / std
# (|x| <= 1e2 even for a channel std of 1e-2), and ZCA whitening multiplies the norm by at most
# 1/sqrt(zca_eps): a standardised 32x32x3 image (|x| <= ~2, norm <= ~1.2e2) stays below ~4e2 at
# eps 0.1 and ~4e3 at eps 1e-3. Real sets, distilled ones drifting past the pixel range included,
# stay well below 1e4; above it the set is mis-scaled (e.g. x 1e30) or in another space. At 1e4 the
# sum of squares of a 64x64x3 image (~1e12) stays far inside float32: no overflow downstream.
MAX_ABS_IMAGE = 1e4


def _check_magnitude(x: np.ndarray, where: str) -> None:
    """ValueError naming ``where`` unless the model-space images are finite and plausibly scaled."""
    if not np.isfinite(x).all():
        raise ValueError(f"{where}: images are not finite in the dataset's input space")
    peak = float(np.abs(x).max())
    if peak > MAX_ABS_IMAGE:
        raise ValueError(f"{where}: images reach |x| = {peak:.3g} in the dataset's input space, "
                         f"over {MAX_ABS_IMAGE:g}: not images of this space (wrong --space or a "
                         "mis-scaled set)")


def convert(args) -> dist_lib.DistilledSet:
    """Reads, checks, decodes and writes the set (``args`` from :func:`parse_args`)."""
    _check_flags(args)
    data_cfg, seed = _data_settings(args)
    src = READERS[args.format](args)
    lr, lr_from = _step_size(args, src)
    dataset = load_dataset(data_cfg, seed=seed)
    where = src["images_from"]
    stored = _to_nhwc(src["images"], src["layout"], dataset.image_shape, where)
    stored_labels = _labels(src["labels"], stored.shape[0], dataset.num_classes,
                            src["labels_from"])
    factor = args.factor or 1
    h, w = stored.shape[1:3]
    if factor > 1 and (h % factor or w % factor or h != w):
        raise ValueError(f"{where}: --factor={factor} must divide the image size {h}x{w} "
                         "(IDC's decode_zoom takes square images)")
    images, labels = idc_decode(stored, stored_labels, factor)
    prep = dataset.preprocessing
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused just below
        images, stored = _to_model_space(images, args, prep), _to_model_space(stored, args, prep)
    for x in (images, stored):
        _check_magnitude(x, where)
    provenance = _provenance(args, src, stored, images, factor, lr, lr_from, data_cfg, seed,
                             prep)
    dset = dist_lib.DistilledSet(
        images=images, labels=labels, lr=lr, preprocessing=prep, dataset=dataset.name,
        stored_images=stored, stored_labels=stored_labels, factor=factor,
        meta={"provenance": provenance, "preprocessing": describe_preprocessing(prep)})
    dist_lib.check_compatible(dset, dataset)
    dist_lib.save_distilled(args.out, dset)  # atomic: temporary file + os.replace
    return dset


def _provenance(args, src, stored, images, factor, lr, lr_from, data_cfg, seed, prep) -> dict:
    """Where the set came from and how it was imported (stored in meta['provenance'])."""
    return {
        "tool": "dp_jax.distill.convert", "format": args.format,
        "sources": {role: {"path": os.path.abspath(p), "sha256": _sha256(p)}
                    for role, p in src["files"].items()},
        "stored_images": int(stored.shape[0]), "images": int(images.shape[0]), "factor": factor,
        "decode": "idc decode_zoom" if factor > 1 else "none", "images_from": src["images_from"],
        "label_source": src["labels_from"], "lr": lr, "lr_source": lr_from, "space": args.space,
        "source_mean": args.source_mean, "source_std": args.source_std,
        "dataset": data_cfg.name, "data": {k: getattr(data_cfg, k) for k in _DATA_FIELDS}, "seed": seed,
        "config": args.config,
        "preprocessing": describe_preprocessing(prep),
        "imported_at": datetime.datetime.now(datetime.timezone.utc).isoformat()}


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
