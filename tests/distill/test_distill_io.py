"""Tests for dp_jax.distill.sets: distilled.npz round trip, validation, compatibility."""

import dataclasses

import numpy as np
import pytest

from dp_jax.data import Dataset, fit_preprocessing
from dp_jax.distill import DistilledSet, check_compatible, load_distilled, save_distilled
from dp_jax.distill.sets import save_grid


def _prep(kind="zca"):
    x = np.random.default_rng(0).random((50, 4, 4, 1)).astype(np.float32)
    return fit_preprocessing(kind, x, zca_eps=0.1)


def _set(kind="zca", n=6):
    rng = np.random.default_rng(1)
    return DistilledSet(images=rng.normal(size=(n, 4, 4, 1)).astype(np.float32),
                        labels=np.arange(n, dtype=np.int32) % 3, lr=0.02,
                        preprocessing=_prep(kind), dataset="npz:tiny",
                        meta={"note": "test"},
                        cost={"expert_examples": 10, "expert_wall_s": 1.0,
                              "distill_examples": 5, "distill_wall_s": 2.0})


def _dataset(prep, name="npz:tiny", shape=(4, 4, 1), classes=3):
    z = np.zeros((3,) + shape, np.float32)
    return Dataset(name=name, x_train=z, y_train=np.arange(3, dtype=np.int32), x_test=z,
                   y_test=np.arange(3, dtype=np.int32), num_classes=classes, preprocessing=prep)


@pytest.mark.parametrize("kind", ["zca", "standard", "none"])
def test_round_trip(tmp_path, kind):
    ds = _set(kind)
    path = str(tmp_path / "distilled.npz")
    save_distilled(path, ds)
    back = load_distilled(path)
    np.testing.assert_array_equal(back.images, ds.images)
    np.testing.assert_array_equal(back.labels, ds.labels)
    assert back.images.dtype == np.float32 and back.labels.dtype == np.int32
    assert back.lr == pytest.approx(0.02) and back.dataset == "npz:tiny"
    assert back.cost == ds.cost and back.meta["note"] == "test"
    assert back.preprocessing["kind"] == kind
    check_compatible(back, _dataset(ds.preprocessing))
    save_grid(str(tmp_path / "grid.png"), back, num_classes=3)
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"


def _write(path, **arrays):
    np.savez(path, **arrays)


def _good_arrays(tmp_path):
    path = str(tmp_path / "good.npz")
    save_distilled(path, _set())
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


@pytest.mark.parametrize("change, match", [
    (lambda a: a.pop("labels"), r"lacks keys \['labels'\]"),
    (lambda a: a.pop("lr"), r"lacks keys \['lr'\]"),
    (lambda a: a.__setitem__("images", np.where(np.arange(16).reshape(4, 4, 1) == 3, np.nan,
                                                a["images"]).astype(np.float32)), "NaN"),
    (lambda a: a.__setitem__("images", a["images"][..., 0]), "images"),
    (lambda a: a.__setitem__("images", a["images"].astype(np.float64)), "float32"),
    (lambda a: a.__setitem__("labels", a["labels"][:-1]), "labels"),
    (lambda a: a.__setitem__("lr", np.float32(-1.0)), "lr"),
    (lambda a: a.__setitem__("lr", np.array([0.1], np.float32)), "lr"),
    (lambda a: a.pop("prep_zca_W"), "prep_zca_W"),
    (lambda a: a.__setitem__("prep_zca_W", np.zeros((3, 3), np.float32)), "prep_zca_W"),
    (lambda a: a.__setitem__("prep_kind", np.array("whiten")), "preprocessing kind"),
])
def test_validation_errors_name_the_file(tmp_path, change, match):
    arrays = _good_arrays(tmp_path)
    change(arrays)
    path = str(tmp_path / "bad.npz")
    _write(path, **arrays)
    with pytest.raises(ValueError, match=match) as e:
        load_distilled(path)
    assert "bad.npz" in str(e.value)


def test_truncated_and_missing_files(tmp_path):
    path = tmp_path / "distilled.npz"
    save_distilled(str(path), _set())
    data = path.read_bytes()
    cut = tmp_path / "cut.npz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.npz"):
        load_distilled(str(cut))
    with pytest.raises(ValueError, match="no such file"):
        load_distilled(str(tmp_path / "absent.npz"))


def test_check_compatible_errors():
    ds = _set("zca")
    with pytest.raises(ValueError, match="different preprocessing: kind"):
        check_compatible(ds, _dataset(_prep("standard")))
    other = _prep("zca")
    other = dict(other, zca_W=other["zca_W"] * 1.5)
    with pytest.raises(ValueError, match="zca_W differs"):
        check_compatible(ds, _dataset(other))
    with pytest.raises(ValueError, match="made from dataset"):
        check_compatible(ds, _dataset(ds.preprocessing, name="fashion_mnist"))
    with pytest.raises(ValueError, match="images"):
        check_compatible(dataclasses.replace(ds, images=np.zeros((6, 4, 4, 2), np.float32)),
                         _dataset(ds.preprocessing))
    with pytest.raises(ValueError, match="classes"):
        check_compatible(ds, _dataset(ds.preprocessing, classes=2))
