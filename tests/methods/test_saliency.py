"""SNIP, GraSP and SynFlow scores against independent references on tiny networks."""

import inspect

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from dp_jax import masks
from dp_jax.methods import saliency
from dp_jax.models import create_model
from dp_jax.training.trainer import cross_entropy

TRACES = {"n": 0}


class MLP(nn.Module):
    """flatten -> Dense -> ReLU -> ... -> Dense (kernels named ``kernel``)."""
    widths: tuple = (5, 3)
    use_bias: bool = True
    count_traces: bool = False

    @nn.compact
    def __call__(self, x, train=False):
        if self.count_traces:
            TRACES["n"] += 1  # Python side effect: runs once per trace, not per call
        x = x.reshape((x.shape[0], -1))
        for i, w in enumerate(self.widths):
            x = nn.Dense(w, use_bias=self.use_bias)(x)
            if i < len(self.widths) - 1:
                x = nn.relu(x)
        return x


def _model(**kw):
    cfg = dict(name="convnet", width=None, depth=None, norm=None, pool=None, width_multiplier=None)
    cfg.update(kw)
    return create_model(ml_collections.ConfigDict(cfg), num_classes=10)


def _numpy_init(model, shape, seed=0):
    """He-normal kernels, unit scales, zero offsets/biases, BN stats (0, 1), built in NumPy.

    Avoids compiling an init program per model (seconds of XLA:CPU time for a ResNet).
    """
    rng = np.random.default_rng(seed)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *shape))))

    def f(path, a):
        name = masks.path_str(path).split("/")[-1]
        if name == "kernel":
            return jnp.asarray(rng.normal(0, np.sqrt(2 / np.prod(a.shape[:-1])), a.shape), a.dtype)
        fill = 1.0 if name in ("scale", "var") else 0.0
        return jnp.full(a.shape, fill, a.dtype)
    return jax.tree_util.tree_map_with_path(f, flax.core.unfreeze(abstract))


def _batches(seed, shape, n_batches=2, size=6, classes=3):
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(size, *shape)).astype(np.float32), np.arange(size) % classes)
            for _ in range(n_batches)]


def _random_mask(params, seed, frac=0.3):
    """Kernels lose about ``frac`` of their entries; other leaves stay all-True."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, a: jnp.asarray(rng.random(a.shape) >= frac if masks.path_str(path).endswith(
            "kernel") else np.ones(a.shape, bool)), params)


def _signed_biases(params, seed):
    """Non-zero (mostly negative) biases so that bias handling is exercised."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, a: jnp.asarray(rng.normal(size=a.shape) - 0.5, a.dtype)
        if masks.path_str(path).endswith("bias") else a, params)


# ----------------------------------------------------------------------------------- SNIP

def _np_mlp_grads(W1, b1, W2, b2, x, y):
    """Hand-derived gradients of mean softmax CE for relu(x W1 + b1) W2 + b2."""
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    a = x @ W1 + b1
    h = np.maximum(a, 0)
    z = h @ W2 + b2
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    dz = (p - np.eye(z.shape[1])[np.asarray(y)]) / len(x)
    dh = dz @ W2.T * (a > 0)
    return x.T @ dh, h.T @ dz


def test_snip_matches_numpy_backprop_on_mlp():
    model = MLP()
    v = _numpy_init(model, (2, 2, 1))
    v["params"] = _signed_biases(v["params"], 1)
    mask = _random_mask(v["params"], 2)
    batches = _batches(3, (2, 2, 1))
    scores = saliency.snip_scores(model, v, mask, batches)

    p = jax.tree.map(lambda a: np.asarray(a, np.float64), masks.apply(v["params"], mask))
    W1, b1 = p["Dense_0"]["kernel"], p["Dense_0"]["bias"]
    W2, b2 = p["Dense_1"]["kernel"], p["Dense_1"]["bias"]
    grads = [_np_mlp_grads(W1, b1, W2, b2, x, y) for x, y in batches]
    g1 = np.mean([g[0] for g in grads], 0)
    g2 = np.mean([g[1] for g in grads], 0)
    np.testing.assert_allclose(scores["Dense_0"]["kernel"], np.abs(g1 * W1), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(scores["Dense_1"]["kernel"], np.abs(g2 * W2), rtol=1e-4, atol=1e-7)
    m1 = np.asarray(mask["Dense_0"]["kernel"])
    assert (~m1).any() and np.all(np.asarray(scores["Dense_0"]["kernel"])[~m1] == 0)


def test_snip_matches_float64_finite_differences_on_bn_convnet():
    # BatchNorm in train mode (batch statistics): the finite differences use the same loss.
    model = _model(width=2, depth=1, norm="batch")
    v = _numpy_init(model, (4, 4, 1))
    mask = _random_mask(v["params"], 1, 0.2)
    batches = _batches(2, (4, 4, 1), classes=10)
    scores = saliency.snip_scores(model, v, mask, batches)

    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), masks.apply(v["params"], mask))
        bs64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), v["batch_stats"])
        b64 = [(jnp.asarray(x, jnp.float64), y) for x, y in batches]

        @jax.jit
        def loss(params):
            return jnp.mean(jnp.stack([cross_entropy(model.apply(
                {"params": params, "batch_stats": bs64}, x, train=True,
                mutable=["batch_stats"])[0], y) for x, y in b64]))

        rng = np.random.default_rng(0)
        h = 1e-5
        for layer in ("conv_0", "head"):
            k = np.asarray(p64[layer]["kernel"])
            alive = np.flatnonzero(np.asarray(mask[layer]["kernel"]).reshape(-1))
            for idx in rng.choice(alive, 4, replace=False):
                pos = np.unravel_index(idx, k.shape)
                def shifted(d):
                    q = jax.tree.map(lambda a: a, p64)
                    q[layer] = dict(q[layer], kernel=q[layer]["kernel"].at[pos].add(d))
                    return float(loss(q))
                fd = (shifted(h) - shifted(-h)) / (2 * h)
                want = abs(fd * k[pos])
                got = float(np.asarray(scores[layer]["kernel"])[pos])
                assert got == pytest.approx(want, rel=2e-3, abs=1e-7), (layer, pos)


# ---------------------------------------------------------------------------------- GraSP

def test_grasp_default_temperature_is_the_reference_codes():
    assert inspect.signature(saliency.grasp_scores).parameters["temperature"].default == 200.0


@pytest.mark.parametrize("temperature", [1.0, 200.0])
def test_grasp_equals_theta_times_dense_hessian_times_g(temperature):
    model = MLP()
    v = _numpy_init(model, (2, 2, 1))
    v["params"] = _signed_biases(v["params"], 1)
    mask = _random_mask(v["params"], 2)
    batches = _batches(3, (2, 2, 1))
    scores = saliency.grasp_scores(model, v, mask, batches, temperature=temperature)

    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), v["params"])
        flat, unravel = ravel_pytree(p64)
        m_flat = ravel_pytree(jax.tree.map(lambda m: m.astype(jnp.float64), mask))[0]
        kern = ravel_pytree(jax.tree_util.tree_map_with_path(
            lambda path, a: jnp.full(a.shape, masks.path_str(path).endswith("kernel"), jnp.float64),
            p64))[0]

        def loss(theta):
            params = unravel(theta * m_flat)
            return jnp.mean(jnp.stack([
                cross_entropy(model.apply({"params": params}, jnp.asarray(x, jnp.float64))
                              / temperature, y) for x, y in batches]))

        H = jax.jit(jax.hessian(loss))(flat)  # dense (43 x 43)
        g = jax.jit(jax.grad(loss))(flat)
        want_flat = (flat * m_flat) * (H @ (g * kern))  # g restricted to kernels, as the reference
        want = jax.tree.map(np.asarray, unravel(want_flat))

    for layer in ("Dense_0", "Dense_1"):
        w, s = want[layer]["kernel"], np.asarray(scores[layer]["kernel"])
        np.testing.assert_allclose(s, w, rtol=1e-3, atol=1e-5 * np.abs(w).max())
    # Sign convention: our lowest score is the weight GraSP's S = -theta * Hg removes first.
    ours = np.concatenate([np.asarray(s).ravel() for s in masks.prunable_leaves(scores).values()])
    paper = -np.concatenate([want[k]["kernel"].ravel() for k in ("Dense_0", "Dense_1")])
    assert np.argmin(ours) == np.argmax(paper)


def test_grasp_runs_on_bn_convnet_and_zeroes_pruned():
    model = _model(width=2, depth=1, norm="batch")
    v = _numpy_init(model, (4, 4, 1))
    mask = _random_mask(v["params"], 1)
    scores = saliency.grasp_scores(model, v, mask, _batches(2, (4, 4, 1)))
    for s, m in zip(masks.prunable_leaves(scores).values(), masks.prunable_leaves(mask).values()):
        s, m = np.asarray(s), np.asarray(m)
        assert np.isfinite(s).all() and np.all(s[~m] == 0) and np.any(s[m] != 0)


# -------------------------------------------------------------------------------- SynFlow

def test_synflow_matches_hand_computed_path_norm_with_abs_biases():
    model = MLP(widths=(4, 2))
    v = _numpy_init(model, (1, 1, 3))
    v["params"] = _signed_biases(v["params"], 1)
    mask = _random_mask(v["params"], 2, 0.25)
    s = saliency.synflow_scores(model, v, mask, (1, 1, 3))

    p = jax.tree.map(lambda a: np.abs(np.asarray(a, np.float64)), masks.apply(v["params"], mask))
    A1, b1, A2 = p["Dense_0"]["kernel"], p["Dense_0"]["bias"], p["Dense_1"]["kernel"]
    h = A1.sum(0) + b1  # hidden units for the all-ones input, |b1| as the reference's linearize
    np.testing.assert_allclose(s["Dense_0"]["kernel"], A1 * A2.sum(1)[None, :], rtol=1e-12)
    np.testing.assert_allclose(s["Dense_1"]["kernel"], A2 * h[:, None], rtol=1e-12)
    assert s["Dense_0"]["kernel"].dtype == jnp.float64


def test_synflow_conserves_flow_per_layer_without_biases():
    # Hand check (3x4, 4x2) plus conservation: each layer's scores sum to R = 1^T f(1).
    model = MLP(widths=(4, 2), use_bias=False)
    v = _numpy_init(model, (1, 1, 3))
    s = saliency.synflow_scores(model, v, masks.ones_like(v["params"]), (1, 1, 3))
    A1, A2 = (np.abs(np.asarray(v["params"][k]["kernel"], np.float64))
              for k in ("Dense_0", "Dense_1"))
    np.testing.assert_allclose(s["Dense_0"]["kernel"], A1 * A2.sum(1)[None, :], rtol=1e-12)
    np.testing.assert_allclose(s["Dense_1"]["kernel"], A2 * A1.sum(0)[:, None], rtol=1e-12)
    R = A1.sum(0) @ A2.sum(1)
    for leaf in masks.prunable_leaves(s).values():
        assert float(np.asarray(leaf).sum()) == pytest.approx(R, rel=1e-12)

    # A conv net at init has zero biases: conservation holds through conv, ReLU and pooling.
    model = _model(width=4, depth=3, norm="none")
    v = _numpy_init(model, (8, 8, 1))
    s = saliency.synflow_scores(model, v, masks.ones_like(v["params"]), (8, 8, 1))
    sums = [float(np.asarray(leaf).sum()) for leaf in masks.prunable_leaves(s).values()]
    assert len(sums) == 4 and max(sums) == pytest.approx(min(sums), rel=1e-10)


def test_synflow_float64_survives_where_float32_overflows():
    model = MLP(widths=(32,) * 11 + (10,), use_bias=False)
    v = _numpy_init(model, (4, 4, 2))
    v["params"] = jax.tree.map(lambda a: a * 1000.0, v["params"])  # R ~ 1e45 > float32 max
    ones = masks.ones_like(v["params"])
    s64 = masks.prunable_leaves(saliency.synflow_scores(model, v, ones, (4, 4, 2)))
    s32 = masks.prunable_leaves(saliency.synflow_scores(model, v, ones, (4, 4, 2),
                                                        dtype=jnp.float32))
    assert all(np.isfinite(np.asarray(a)).all() for a in s64.values())
    assert not all(np.isfinite(np.asarray(a)).all() for a in s32.values())
    sums = [float(np.asarray(a).sum()) for a in s64.values()]
    assert min(sums) > 1e40 and max(sums) == pytest.approx(min(sums), rel=1e-9)
    with pytest.raises(FloatingPointError):
        saliency.synflow_prune(model, v, ones, (4, 4, 2), target_density=0.5, iters=2,
                               dtype=jnp.float32)


def test_synflow_finite_and_nonzero_on_deep_nets():
    for cfg, shape, n_layers in [
            (dict(name="resnet18", width=4, num_blocks=(1, 1, 1, 1)), (16, 16, 3), 13),
            (dict(name="convnet", width=16, depth=4, norm="batch"), (32, 32, 3), 5)]:
        model = create_model(ml_collections.ConfigDict(cfg), num_classes=10)
        v = _numpy_init(model, shape)
        s = saliency.synflow_scores(model, v, masks.ones_like(v["params"]), shape)
        leaves = [np.asarray(a) for a in masks.prunable_leaves(s).values()]
        assert len(leaves) == n_layers
        assert all(np.isfinite(a).all() and (a > 0).any() for a in leaves)


def test_iterative_synflow_avoids_the_layer_collapse_of_magnitude_pruning():
    model = MLP(widths=(64, 64, 10))
    v = _numpy_init(model, (8, 8, 1))
    v["params"]["Dense_1"]["kernel"] = v["params"]["Dense_1"]["kernel"] * 1e-3
    ones = masks.ones_like(v["params"])
    mag = masks.prune(masks.magnitude_scores(v["params"]), ones, 0.99, on_empty_layer="ignore")
    assert not np.asarray(mag["Dense_1"]["kernel"]).any()  # the premise: magnitude collapses

    mask = saliency.synflow_prune(model, v, ones, (8, 8, 1), target_density=0.01, iters=100)
    alive, total = masks.count(mask)
    assert alive == round(0.01 * total)
    assert all(np.asarray(m).any() for m in masks.prunable_leaves(mask).values())


@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_synflow_prune_hits_exact_counts_from_a_sparse_start(scope):
    model = MLP(widths=(16, 10))
    v = _numpy_init(model, (4, 4, 1))
    start = _random_mask(v["params"], 1, 0.3)
    alive0, total = masks.count(start)
    calls = []

    def prune_fn(scores, mask, fraction, *, scope):
        calls.append(scope)
        return masks.prune(scores, mask, fraction, scope=scope)

    target = 0.0537
    mask = saliency.synflow_prune(model, v, start, (4, 4, 1), target_density=target, iters=7,
                                  scope=scope, prune_fn=prune_fn)
    assert calls
    leaves0, leaves = masks.prunable_leaves(start), masks.prunable_leaves(mask)
    for k in leaves:  # nested: nothing regrows
        assert not np.any(np.asarray(leaves[k]) & ~np.asarray(leaves0[k]))
    if scope == "global":
        assert masks.count(mask)[0] == round(target * total)
    else:
        d0 = alive0 / total
        for k in leaves:
            want = round(target / d0 * np.asarray(leaves0[k]).sum())
            assert int(np.asarray(leaves[k]).sum()) == want
    for bad in (0.9, 1e-6):  # above the start density; rounds to an empty net/layer
        with pytest.raises(ValueError):
            saliency.synflow_prune(model, v, start, (4, 4, 1), target_density=bad, iters=2,
                                   scope=scope)


# ------------------------------------------------------------------------------ compiling

def test_score_functions_do_not_retrace_across_calls():
    model = MLP(count_traces=True)
    v = _numpy_init(model, (2, 2, 1))
    batches = _batches(1, (2, 2, 1))
    mask_a = masks.ones_like(v["params"])
    mask_b = _random_mask(v["params"], 2)
    v2 = dict(v, params=jax.tree.map(lambda a: 2 * a, v["params"]))
    for fn in (lambda vv, m: saliency.snip_scores(model, vv, m, batches),
               lambda vv, m: saliency.grasp_scores(model, vv, m, batches),
               lambda vv, m: saliency.synflow_scores(model, vv, m, (2, 2, 1))):
        jax.block_until_ready(fn(v, mask_a))
        n = TRACES["n"]
        jax.block_until_ready(fn(v2, mask_b))  # new weights and mask, same shapes
        jax.block_until_ready(fn(v, mask_b))
        assert TRACES["n"] == n
