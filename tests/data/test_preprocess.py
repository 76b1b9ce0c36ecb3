"""Tests for dp_jax.data.preprocess: standardisation, ZCA whitening and their inverses."""

import json

import numpy as np
import pytest

from dp_jax.data import preprocess as pre


def _images(n=2000, shape=(4, 4, 3), seed=0):
    """Correlated pixels in [0, 1]: a low-rank mix plus noise, so ZCA has real work to do."""
    rng = np.random.default_rng(seed)
    d = int(np.prod(shape))
    mix = rng.normal(size=(8, d))
    x = rng.normal(size=(n, 8)) @ mix * 0.05 + rng.normal(size=(n, d)) * 0.02 + 0.5
    return np.clip(x, 0, 1).reshape((n,) + shape).astype(np.float32)


def test_fit_standard_matches_numpy():
    x = _images()
    mean, std = pre.fit_standard(x)
    assert mean.dtype == np.float32 and mean.shape == (3,)
    np.testing.assert_allclose(mean, x.reshape(-1, 3).mean(0), rtol=1e-5)
    np.testing.assert_allclose(std, x.reshape(-1, 3).std(0), rtol=1e-4)
    y = pre.apply_standard(x, mean, std)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y.reshape(-1, 3).mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(y.reshape(-1, 3).std(0), 1, atol=1e-4)
    np.testing.assert_allclose(pre.invert_standard(y, mean, std), x, atol=1e-6)


def test_fit_standard_constant_channel_keeps_finite_values():
    x = np.zeros((5, 2, 2, 2), np.float32)
    x[..., 1] = np.arange(20, dtype=np.float32).reshape(5, 2, 2) / 20
    mean, std = pre.fit_standard(x)
    assert std[0] == 1.0
    assert np.isfinite(pre.apply_standard(x, mean, std)).all()


def test_zca_whitened_covariance_matches_closed_form():
    eps = 0.1
    x = _images()
    flat = x.reshape(len(x), -1).astype(np.float64)
    s, u = np.linalg.eigh(np.cov(flat, rowvar=False))
    expected = (u * (np.clip(s, 0, None) / (np.clip(s, 0, None) + eps))) @ u.T

    zca = pre.fit_zca(x, eps=eps)
    assert zca["W"].dtype == np.float32 and zca["W"].shape == (48, 48)
    np.testing.assert_allclose(zca["W"], zca["W"].T, atol=1e-6)
    y = pre.apply_zca(x, zca)
    assert y.shape == x.shape and y.dtype == np.float32
    cov = np.cov(y.reshape(len(y), -1).astype(np.float64), rowvar=False)
    np.testing.assert_allclose(cov, expected, atol=2e-4)


def test_zca_tiny_eps_whitens_to_identity():
    x = _images(n=3000)
    zca = pre.fit_zca(x, eps=1e-8)
    y = pre.apply_zca(x, zca).reshape(len(x), -1).astype(np.float64)
    np.testing.assert_allclose(y.mean(0), 0, atol=1e-3)
    np.testing.assert_allclose(np.cov(y, rowvar=False), np.eye(48), atol=5e-3)


def test_zca_round_trip_batch_and_single_example():
    x = _images()
    zca = pre.fit_zca(x)
    np.testing.assert_allclose(pre.invert_zca(pre.apply_zca(x, zca), zca), x, atol=1e-5)
    single = x[3]
    np.testing.assert_allclose(pre.apply_zca(single, zca), pre.apply_zca(x[3:4], zca)[0],
                               atol=1e-6)


def test_zca_rejects_too_many_features():
    x = np.zeros((2, 128, 128, 3), np.float32)
    with pytest.raises(ValueError, match="too large"):
        pre.fit_zca(x)


def test_zca_rejects_bad_inputs():
    with pytest.raises(ValueError, match="at least 2 examples"):
        pre.fit_zca(np.zeros((1, 2, 2, 1), np.float32))
    zca = pre.fit_zca(_images(n=100))
    with pytest.raises(ValueError, match="feature block of size 48"):
        pre.apply_zca(np.zeros((3, 5, 5, 3), np.float32), zca)


def test_fit_preprocessing_zca_standardises_then_whitens():
    x = _images()
    p = pre.fit_preprocessing("zca", x, zca_eps=0.1)
    assert p["kind"] == "zca" and p["zca_eps"] == 0.1
    mean, std = pre.fit_standard(x)
    np.testing.assert_allclose(p["mean"], mean)
    np.testing.assert_allclose(p["std"], std)
    direct = pre.apply_zca(pre.apply_standard(x, mean, std), pre.fit_zca(
        pre.apply_standard(x, mean, std), eps=0.1))
    np.testing.assert_allclose(pre.apply_preprocessing(x, p), direct, atol=1e-5)


@pytest.mark.parametrize("kind", ["none", "standard", "zca"])
def test_to_pixels_inverts_apply(kind):
    x = _images()
    p = pre.fit_preprocessing(kind, x)
    y = pre.apply_preprocessing(x, p)
    if kind == "none":
        np.testing.assert_array_equal(y, x)
    back = pre.to_pixels(y, p)
    assert back.dtype == np.float32
    np.testing.assert_allclose(back, x, atol=2e-5)


def test_to_pixels_clips_to_unit_range():
    p = pre.fit_preprocessing("standard", _images())
    out = pre.to_pixels(np.full((1, 4, 4, 3), 100.0, np.float32), p)
    assert out.max() == 1.0
    out = pre.to_pixels(np.full((1, 4, 4, 3), -100.0, np.float32), p)
    assert out.min() == 0.0


def test_describe_preprocessing_is_json_and_cannot_invert_zca():
    p = pre.fit_preprocessing("zca", _images(n=200))
    summary = pre.describe_preprocessing(p)
    json.dumps(summary)
    assert summary["zca_W"] == {"shape": [48, 48]}
    with pytest.raises(ValueError, match="ZCA matrices are needed"):
        pre.to_pixels(np.zeros((1, 4, 4, 3), np.float32), summary)


def test_unknown_kind():
    with pytest.raises(ValueError, match="unknown preprocess 'pca'"):
        pre.fit_preprocessing("pca", _images(n=10))
