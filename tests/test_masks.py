"""Mask semantics against an independent NumPy implementation of magnitude pruning."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dp_jax import masks


def reference_prune(weights: dict, alive: dict, fraction: float, scope: str) -> dict:
    """Plain NumPy magnitude pruning: remove round(fraction * alive) smallest |w|.

    Ties go to the lower flat index, where the flat order is the concatenation of
    layers in the given (sorted-key) order. Written independently of dp_jax.masks:
    a stable argsort over (|w|, position) pairs built by hand.
    """
    keys = sorted(weights)
    out = {k: alive[k].copy() for k in keys}
    groups = [keys] if scope == "global" else [[k] for k in keys]
    for group in groups:
        entries = []  # (score, position, key, flat index)
        pos = 0
        for k in group:
            w = np.abs(weights[k]).reshape(-1)
            a = alive[k].reshape(-1)
            for i in range(w.size):
                if a[i]:
                    entries.append((float(w[i]), pos + i, k, i))
            pos += w.size
        n = int(round(fraction * len(entries)))
        entries.sort(key=lambda e: (e[0], e[1]))
        for _, _, k, i in entries[:n]:
            flat = out[k].reshape(-1)
            flat[i] = False
            out[k] = flat.reshape(alive[k].shape)
    return out


def make_params(rng, ties=False):
    p = {"Dense_0": {"kernel": rng.normal(size=(6, 5)).astype(np.float32),
                     "bias": rng.normal(size=(5,)).astype(np.float32)},
         "Dense_1": {"kernel": rng.normal(size=(5, 3)).astype(np.float32),
                     "bias": np.zeros((3,), np.float32)},
         "Conv_0": {"kernel": rng.normal(size=(2, 2, 1, 4)).astype(np.float32)}}
    if ties:  # quantise so many weights share a magnitude, across layers too
        p = jax.tree.map(lambda x: np.round(x * 2) / 2, p)
    return p


@pytest.mark.parametrize("scope", ["global", "layerwise"])
@pytest.mark.parametrize("ties", [False, True])
def test_prune_matches_numpy_reference_over_rounds(scope, ties):
    rng = np.random.default_rng(0)
    params = make_params(rng, ties)
    mask = masks.ones_like(params)
    ref_alive = {k: np.ones_like(v, dtype=bool) for k, v in masks.prunable_leaves(params).items()}
    for rnd in range(5):
        # New "trained" weights every round, as in IMP.
        params = make_params(np.random.default_rng(rnd + 1), ties)
        mask = masks.prune(masks.magnitude_scores(params), mask, 0.2, scope=scope)
        ref_alive = reference_prune(
            {k: np.asarray(v) for k, v in masks.prunable_leaves(params).items()}, ref_alive, 0.2, scope)
        got = {k: np.asarray(v) for k, v in masks.prunable_leaves(mask).items()}
        assert sorted(got) == sorted(ref_alive)
        for k in got:
            np.testing.assert_array_equal(got[k], ref_alive[k], err_msg=f"round {rnd} {k}")
    # Biases are never pruned.
    assert all(np.all(np.asarray(mask[layer]["bias"])) for layer in ("Dense_0", "Dense_1"))


def test_sparsity_schedule_and_nesting():
    params = make_params(np.random.default_rng(0))
    mask = masks.ones_like(params)
    total = masks.count(mask)[1]
    prev = mask
    alive = total
    for r in range(1, 8):
        mask = masks.prune(masks.random_scores(params, jax.random.key(r)), prev, 0.2)
        alive = alive - int(round(0.2 * alive))
        assert masks.count(mask) == (alive, total)
        # Nested: nothing pruned before comes back.
        for k, v in masks.prunable_leaves(mask).items():
            assert not np.any(np.asarray(v) & ~np.asarray(masks.prunable_leaves(prev)[k]))
        prev = mask
    assert masks.sparsity(mask) == pytest.approx(1 - alive / total)


def test_global_vs_layerwise_distribution():
    # One layer with tiny weights: global pruning takes it first, layerwise spreads evenly.
    params = {"a": {"kernel": np.full((10, 10), 0.01, np.float32) + np.arange(100).reshape(10, 10) * 1e-5},
              "b": {"kernel": np.full((10, 10), 1.0, np.float32) + np.arange(100).reshape(10, 10) * 1e-5}}
    m = masks.ones_like(params)
    g = masks.layer_sparsity(masks.prune(masks.magnitude_scores(params), m, 0.4, scope="global"))
    lw = masks.layer_sparsity(masks.prune(masks.magnitude_scores(params), m, 0.4, scope="layerwise"))
    assert g == {"a/kernel": pytest.approx(0.8), "b/kernel": pytest.approx(0.0)}
    assert lw == {"a/kernel": pytest.approx(0.4), "b/kernel": pytest.approx(0.4)}


def test_empty_layer_guard():
    params = {"a": {"kernel": np.full((2, 2), 1e-3, np.float32)},
              "b": {"kernel": np.ones((10, 10), np.float32)}}
    m = masks.ones_like(params)
    with pytest.warns(RuntimeWarning, match="a/kernel"):
        masks.prune(masks.magnitude_scores(params), m, 0.1)
    with pytest.raises(ValueError, match="disconnected"):
        masks.prune(masks.magnitude_scores(params), m, 0.1, on_empty_layer="error")


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_bad_fraction(fraction):
    params = make_params(np.random.default_rng(0))
    with pytest.raises(ValueError, match="fraction"):
        masks.prune(params, masks.ones_like(params), fraction)


def test_save_load_roundtrip_and_corruption(tmp_path):
    params = make_params(np.random.default_rng(0))
    mask = masks.prune(masks.magnitude_scores(params), masks.ones_like(params), 0.5)
    path = str(tmp_path / "m.npz")
    masks.save(path, mask)
    with np.load(path) as z:
        assert "Dense_0/kernel" in z.files and z["Dense_0/kernel"].dtype == np.bool_
    back = masks.load(path, params)
    jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, mask))
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="unreadable or truncated"):
        masks.load(path, params)
    other = dict(params, extra={"kernel": np.ones((2, 2), np.float32)})
    masks.save(path, mask)
    with pytest.raises(ValueError, match="no entry"):
        masks.load(path, other)


def test_hamming_iou():
    a = {"l": {"kernel": jnp.array([[True, True], [False, False]])}}
    b = {"l": {"kernel": jnp.array([[True, False], [True, False]])}}
    assert masks.hamming(a, b) == {"hamming": 0.5, "iou": pytest.approx(1 / 3)}


def test_from_flat_inverts_to_flat_and_feeds_the_mask_functions():
    """A mask read back without a model (the report's case) gives the same figures."""
    a = {"Dense_0": {"kernel": np.array([[1, 0], [1, 1]], bool), "bias": np.ones(2, bool)},
         "head": {"kernel": np.array([[0, 1]], bool)}}
    b = {"Dense_0": {"kernel": np.array([[1, 1], [0, 1]], bool), "bias": np.ones(2, bool)},
         "head": {"kernel": np.array([[0, 1]], bool)}}
    fa = masks.from_flat(masks.to_flat(a))
    assert masks.to_flat(fa).keys() == masks.to_flat(a).keys()
    # By hand: kernels flattened [1,0,1,1,0,1] vs [1,1,0,1,0,1] differ in 2 of 6; kept 4 and 4
    # with 3 in common, union 5.
    d = masks.hamming(fa, masks.from_flat(masks.to_flat(b)))
    assert d == {"hamming": 2 / 6, "iou": 3 / 5}
    assert masks.layer_sparsity(fa) == {"Dense_0/kernel": 0.25, "head/kernel": 0.5}
