"""Tests for dp_jax.data.augment: DSA ops, determinism, differentiability, limits, names."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dp_jax.data import augment as aug


def _batch(shape=(6, 12, 10, 3), seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


@pytest.mark.parametrize("op", aug.DSA_OPS + ("color_crop_cutout_flip_scale_rotate",))
def test_shapes_and_dtype(op):
    x = _batch()
    y = jax.jit(lambda k, v: aug.dsa(k, v, strategy=op))(jax.random.key(1), x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert bool(jnp.isfinite(y).all())


@pytest.mark.parametrize("name", ["dsa", "flip_translate", "flip_crop"])
def test_same_key_same_transform_other_key_differs(name):
    f = jax.jit(aug.make_augment(name))
    x = _batch()
    a, b = f(jax.random.key(3), x), f(jax.random.key(3), x)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    outs = [np.asarray(f(jax.random.key(k), x)) for k in range(4, 9)]
    assert any(not np.array_equal(outs[0], o) for o in outs[1:])


@pytest.mark.parametrize("op", aug.DSA_OPS)
def test_each_op_changes_images_at_full_strength(op):
    x = _batch()
    f = jax.jit(lambda k, v: aug.dsa(k, v, strategy=op))
    outs = [f(jax.random.key(k), x) for k in range(3)]
    assert any(float(jnp.abs(o - x).max()) > 1e-3 for o in outs)


@pytest.mark.parametrize("op", aug.DSA_OPS)
def test_zero_strength_is_identity(op):
    x = _batch()
    y = aug.dsa(jax.random.key(5), x, strategy=op, strength=0.0)
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=2e-5)


def test_zero_strength_identity_through_make_augment_all_ops():
    x = _batch()
    f = aug.make_augment("dsa", strength=0.0, all_ops=True)
    np.testing.assert_allclose(np.asarray(f(jax.random.key(0), x)), np.asarray(x), atol=5e-5)
    g = aug.make_augment("flip_translate", strength=0.0)
    np.testing.assert_allclose(np.asarray(g(jax.random.key(0), x)), np.asarray(x), atol=0)


@pytest.mark.parametrize("all_ops", [False, True])
def test_differentiable_wrt_images(all_ops):
    x = _batch()
    f = aug.make_augment("dsa", all_ops=all_ops)
    grad = jax.jit(jax.grad(lambda v, k: jnp.sum(jnp.sin(f(k, v)))))
    for k in range(4):
        g = grad(x, jax.random.key(k))
        assert g.shape == x.shape and bool(jnp.isfinite(g).all())
        assert float(jnp.abs(g).sum()) > 0


def test_gradient_matches_finite_differences():
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(2), (3, 8, 8, 2), jnp.float64)
        d = jax.random.normal(jax.random.key(4), x.shape, jnp.float64)
        f = jax.jit(lambda v, k: jnp.sum(jnp.sin(aug.dsa(k, v))))
        jvp = jax.jit(lambda v, k: jnp.vdot(jax.grad(f)(v, k), d))
        eps = 1e-6
        for k in range(6):
            key = jax.random.key(k)
            fd = (f(x + eps * d, key) - f(x - eps * d, key)) / (2 * eps)
            np.testing.assert_allclose(float(jvp(x, key)), float(fd), rtol=1e-6)


def test_flip_is_a_mirror():
    x = _batch((4, 5, 7, 1))
    y = aug.flip(jax.random.key(0), x, aug.DSAParams(flip=1.0))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x[:, :, ::-1]))


def test_affine_matches_torch_grid_sample():
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 9, 11, 2)).astype(np.float32)
    theta = (rng.normal(size=(3, 2, 3)) * 0.4 + np.array([[1, 0, 0], [0, 1, 0]])).astype(np.float32)
    ours = np.asarray(aug._affine(jnp.asarray(x), jnp.asarray(theta)))
    xt = torch.tensor(x).permute(0, 3, 1, 2)
    grid = F.affine_grid(torch.tensor(theta), list(xt.shape), align_corners=True)
    ref = F.grid_sample(xt, grid, align_corners=True).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_make_augment_names_and_errors():
    assert aug.make_augment("none") is None
    assert callable(aug.make_augment("dsa")) and callable(aug.make_augment("flip_crop"))
    with pytest.raises(ValueError, match="allowed: none, dsa, flip_translate"):
        aug.make_augment("cutmix")
    with pytest.raises(ValueError, match="strength"):
        aug.make_augment("dsa", strength=-1.0)
    with pytest.raises(ValueError, match="unknown op"):
        aug.make_augment("dsa", strategy="color_blur")


def test_vmap_over_keys():
    x = _batch()
    f = aug.make_augment("dsa")
    keys = jax.random.split(jax.random.key(0), 3)
    out = jax.jit(jax.vmap(lambda k: f(k, x)))(keys)
    np.testing.assert_allclose(np.asarray(out[1]), np.asarray(jax.jit(f)(keys[1], x)), atol=1e-6)
