"""Tests for dp_jax.analysis: barriers, the vmapped alpha sweep, copies, Hessian, landscapes.

Tiny models and data are generated here; the dense-Hessian oracle (``jax.hessian`` +
``eigh``) runs on networks with a few dozen parameters.
"""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dp_jax.training import optimizers
from dp_jax import masks as masks_lib
from dp_jax import rng
from dp_jax.training import trainer as train_lib
from dp_jax.analysis import family, hessian, instability, landscape


class TinyMLP(nn.Module):
    """flatten -> Dense -> tanh -> (BatchNorm) -> Dense: smooth, a few dozen parameters."""
    hidden: int = 5
    classes: int = 3
    bn: bool = False

    @nn.compact
    def __call__(self, x, train=False):
        x = x.reshape((x.shape[0], -1))
        x = jnp.tanh(nn.Dense(self.hidden, name="fc1")(x))
        if self.bn:
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(x)
        return nn.Dense(self.classes, name="head")(x)


class InputBN(nn.Module):
    """BatchNorm directly on the input: its batch statistics are those of x."""

    @nn.compact
    def __call__(self, x, train=False):
        x = x.reshape((x.shape[0], -1))
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(x)
        return nn.Dense(3, name="head")(x)


def _data(n=64, shape=(2, 2, 1), classes=3, seed=0):
    kx, ky = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, (n, *shape)), jax.random.randint(ky, (n,), 0, classes)


def _masked(params, fraction=0.4, seed=3):
    mask = masks_lib.prune(masks_lib.random_scores(params, jax.random.key(seed)),
                           masks_lib.ones_like(params), fraction)
    return masks_lib.apply(params, mask), mask


# ---------------------------------------------------------------- barriers


def test_barrier_hand_computed():
    alphas = [0.0, 0.25, 0.5, 0.75, 1.0]
    err = [0.10, 0.15, 0.30, 0.20, 0.12]
    assert instability.barrier(alphas, err) == pytest.approx(0.30 - 0.11)
    # Points outside [0, 1] do not count; a monotone path has barrier max(ends) - mean(ends).
    assert instability.barrier([-0.5, 0, 0.5, 1, 1.5], [9, 0.2, 0.1, 0.4, 9]) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        instability.barrier([0.1, 0.5, 1.0], [1, 2, 3])


# ---------------------------------------------------------------- alpha sweep


def _plain_eval(model, v, mask, x, y):
    params = masks_lib.apply(v["params"], mask)
    stats = {"batch_stats": v["batch_stats"]} if v["batch_stats"] else {}
    variables = {"params": params, **stats}
    logits = model.apply(variables, x, train=False)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return float(loss), float(1 - jnp.mean(jnp.argmax(logits, -1) == y))


@pytest.mark.parametrize("bn", [False, True])
def test_alpha_sweep_traces_once_and_reproduces_endpoints(monkeypatch, bn):
    x, y = _data(n=50)  # 50 test examples in batches of 16: a padded last batch
    model = TinyMLP(bn=bn)
    ends = []
    for s in (1, 2):
        v = model.init(jax.random.key(s), x)
        ends.append({"params": v["params"], "batch_stats": v.get("batch_stats", {})})
    if bn:  # non-trivial statistics at the endpoints
        for e, s in zip(ends, (0.5, 2.0)):
            e["batch_stats"] = jax.tree.map(lambda a: a + s, e["batch_stats"])
    params0, mask = _masked(ends[0]["params"])
    ends[0]["params"] = params0
    ends[1]["params"] = masks_lib.apply(ends[1]["params"], mask)
    # Count traces of the per-point function: vmap traces it once; a Python loop
    # over alphas, or a retrace on new values, would trip the counter.
    chex.clear_trace_counter()  # counts are per function, shared by the parametrisations
    monkeypatch.setattr(family, "eval_point", chex.assert_max_traces(family.eval_point, n=1))
    ev = family.FamilyEvaluator(model, eval_batch_size=16)
    alphas = np.linspace(0, 1, 11)
    r1 = instability.interpolate(ev, ends[0], ends[1], mask, x, y, alphas=alphas)
    r2 = instability.interpolate(ev, ends[1], ends[0], mask, x, y, alphas=alphas[::-1] * 1.0)
    lw = instability.layerwise(ev, ends[0], ends[1], mask, x, y, alphas=alphas)  # same program
    # r2 swaps the endpoints and reverses the grid: both start at ends[0] (alpha 0 / 1).
    for e, i in ((ends[0], 0), (ends[1], -1)):
        loss, err = _plain_eval(model, e, mask, x, y)
        assert r1["loss"][i] == pytest.approx(loss, rel=1e-5)
        assert r1["error"][i] == pytest.approx(err, abs=1e-7)
        assert r2["loss"][i] == pytest.approx(loss, rel=1e-5)
    assert set(lw) == set(family.layer_names(ends[0]["params"]))
    # The curve's barrier is what barrier() computes from it.
    assert r1["barrier"] == pytest.approx(instability.barrier(alphas, r1["error"]))
    # Interpolating a single layer leaves alpha = 0 at the first endpoint.
    assert lw["fc1"]["loss"][0] == pytest.approx(r1["loss"][0], rel=1e-6)


def test_recomputed_batchnorm_statistics_are_batch_averages():
    x, y = _data(n=48, shape=(4,))
    model = InputBN()
    v = model.init(jax.random.key(0), x)
    a = {"params": v["params"], "batch_stats": v["batch_stats"]}
    mask = masks_lib.ones_like(a["params"])
    batches = family.bn_batches(x, jax.random.key(1), num_batches=3, batch_size=16)
    ev = family.FamilyEvaluator(model)
    anchors = family.stack([a, a])
    sel = {"params": family.ones_selector(a["params"]),
           "batch_stats": family.ones_selector(a["batch_stats"])}
    stats = ev.batch_stats(anchors, jnp.asarray([[1.0, 0.0], [0.5, 0.5]]), mask, sel=sel,
                           bn_mode="recompute", bn_batches=batches)
    xb = np.asarray(batches).reshape(3, 16, -1)
    want_mean = xb.mean(1).mean(0)
    want_var = xb.var(1).mean(0)  # average of per-batch biased variances
    np.testing.assert_allclose(stats["bn"]["mean"][0], want_mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stats["bn"]["var"][1], want_var, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="momentum"):
        family.FamilyEvaluator(model, bn_momentum=0.5).batch_stats(
            anchors, jnp.asarray([[1.0, 0.0]]), mask, sel=sel, bn_mode="recompute",
            bn_batches=batches)


# ---------------------------------------------------------------- copies


@pytest.mark.parametrize("loop", ["scan", "python"])
def test_copy_with_the_run_key_retraces_the_trainer(loop):
    x, y = _data(n=40, shape=(4,))
    model = TinyMLP()
    v = model.init(jax.random.key(0), x)
    _, mask = _masked(v["params"])
    num_steps = 7  # 2 epochs of 4 steps, stopping mid-epoch
    tx = optimizers.make_optimizer(train_lib_cfg(), num_steps)
    key = jax.random.key(5)
    trainer = train_lib.Trainer(model, tx, batch_size=10, num_train=40, loop="scan")
    ref, _ = trainer.train(train_lib.create_state(v, mask, tx), x, y, key, num_steps)
    ct = instability.CopyTrainer(model, tx, batch_size=10, num_train=40, loop=loop)
    keys = jnp.stack([key, jax.random.key(6)])
    state = ct.init(v, mask, 2, start_step=0)
    state, metrics = ct.train(state, x, y, keys, 3)   # stop and resume mid-epoch
    state, metrics = ct.train(state, x, y, keys, num_steps)
    chex.assert_trees_all_close(family.unstack(state.params, 0), ref.params, rtol=1e-5, atol=1e-6)
    assert int(state.step[0]) == num_steps and len(metrics["loss"]) == 2
    other = family.unstack(state.params, 1)
    assert float(optax.tree.norm(jax.tree.map(jnp.subtract, other, ref.params))) > 1e-4
    # Pruned weights stay zero in every copy.
    for p, m in zip(jax.tree.leaves(state.params), jax.tree.leaves(mask)):
        assert np.all(np.asarray(p)[:, ~np.asarray(m)] == 0)


def train_lib_cfg():
    from dp_jax.training.settings import TrainSettings
    return TrainSettings.from_config(lr=0.1, momentum=0.9, weight_decay=5e-4, optimizer="sgd",
                                     schedule="multistep", decay_at=(0.5,), decay_factor=0.1)


def test_copy_keys():
    k = instability.copy_keys(0, 3)
    assert k.shape == (3,)
    want = jax.random.fold_in(jax.random.key(0), 1)  # KEY_DATA
    np.testing.assert_array_equal(jax.random.key_data(k[0]), jax.random.key_data(want))
    with pytest.raises(ValueError):
        instability.copy_keys(0, 1)


def test_l2_distance():
    a = {"l": {"kernel": jnp.ones((2, 2))}, "m": {"bias": jnp.zeros(3)}}
    b = {"l": {"kernel": jnp.zeros((2, 2))}, "m": {"bias": jnp.full(3, 2.0)}}
    d = instability.l2_distance(a, b)
    assert d["l2"] == pytest.approx(4.0)
    assert d["by_layer"] == pytest.approx({"l": 2.0, "m": np.sqrt(12)})
    assert d["relative"] == pytest.approx(4.0 / (0.5 * (2 + np.sqrt(12))))


# ---------------------------------------------------------------- Hessian


@functools.lru_cache(maxsize=None)  # one engine (and compilation) per variant for the module
def _hessian_case(bn: bool):
    x, y = _data(n=60, seed=1)
    model = TinyMLP(bn=bn)
    v = model.init(jax.random.key(2), x)
    params, mask = _masked(v["params"])
    stats = v.get("batch_stats", {})
    if bn:
        stats = {"bn": {"mean": stats["bn"]["mean"] + 0.1, "var": stats["bn"]["var"] * 1.5}}
    eng = hessian.HessianEngine(model, params)
    op = eng.bind(params, stats, mask, x, y, batch_size=25)  # 3 batches, the last padded

    def loss(theta):
        p = eng.unravel(theta * op.mflat)
        variables = {"params": p, **({"batch_stats": stats} if stats else {})}
        return train_lib.cross_entropy(model.apply(variables, x, train=False), y)

    H = np.asarray(jax.jit(jax.hessian(loss))(op.theta), np.float64)
    keep = np.asarray(op.mflat) > 0
    return op, loss, H, keep


@pytest.mark.parametrize("bn", [False, True])
def test_hvp_equals_dense_hessian_and_is_masked(bn):
    op, loss, H, keep = _hessian_case(bn)
    assert op.loss() == pytest.approx(float(loss(op.theta)), rel=1e-5)
    assert 0 < keep.sum() < keep.size
    v = jax.random.normal(jax.random.key(7), op.theta.shape)
    hv = np.asarray(op.matvec(v))
    np.testing.assert_allclose(hv, H @ (np.asarray(v) * keep), rtol=1e-4, atol=1e-6)
    assert np.all(hv[~keep] == 0)
    hv2 = np.asarray(op.matvec_many(jnp.stack([v, 2 * v])))
    np.testing.assert_allclose(hv2[1], 2 * hv, rtol=1e-5, atol=1e-6)


class TinyConv(nn.Module):
    """Two 3x3 convs (1 -> 5 -> 3 channels: the patch-product and canonical paths of
    dp_jax.models.convs) -> dense."""

    @nn.compact
    def __call__(self, x, train=False):
        x = jnp.tanh(nn.Conv(5, (3, 3), name="conv_0")(x))
        x = jnp.tanh(nn.Conv(3, (3, 3), name="conv_1")(x))
        return nn.Dense(3, name="head")(x.reshape((x.shape[0], -1)))


def test_hvp_through_fast_convs_equals_dense_hessian():
    # The engine's HVP runs reverse-over-reverse through the custom-VJP convolutions; the
    # oracle is jax.hessian of the plain lax convolutions.
    x, y = _data(n=30, shape=(4, 4, 1), seed=4)
    model = TinyConv()
    params, mask = _masked(model.init(jax.random.key(5), x)["params"])
    op = hessian.HessianEngine(model, params).bind(params, {}, mask, x, y, batch_size=16)

    def loss(theta):
        return train_lib.cross_entropy(model.apply({"params": op.unravel(theta * op.mflat)}, x), y)
    H = np.asarray(jax.jit(jax.hessian(loss))(op.theta), np.float64)
    keep = np.asarray(op.mflat) > 0
    v = jax.random.normal(jax.random.key(8), op.theta.shape)
    np.testing.assert_allclose(np.asarray(op.matvec(v)), H @ (np.asarray(v) * keep),
                               rtol=2e-4, atol=2e-6)


@pytest.mark.parametrize("bn", [False, True])
def test_lanczos_and_hutchinson_match_the_dense_oracle(bn):
    op, _, H, keep = _hessian_case(bn)
    Hr = H[np.ix_(keep, keep)]
    eig = np.linalg.eigvalsh(Hr)
    top = hessian.top_eigenvalues(op, jax.random.key(5), k=3, num_steps=keep.sum())
    np.testing.assert_allclose(top["top_eigenvalues"], eig[::-1][:3], rtol=1e-3)
    assert top["min_eigenvalue"] == pytest.approx(eig[0], rel=1e-3, abs=1e-5)
    # Few steps still find the top eigenvalue (extremal Ritz values converge first).
    few = hessian.top_eigenvalues(op, jax.random.key(5), k=1, num_steps=15)
    assert few["top_eigenvalues"][0] == pytest.approx(eig[-1], rel=1e-3)
    # Hutchinson: unbiased, Var(v^T H v) = 2 sum_{i != j} H_ij^2 for Rademacher v.
    n = 3000
    hut = hessian.hutchinson(op, jax.random.key(9), num_probes=n, probe_batch=500)
    off = Hr - np.diag(np.diag(Hr))
    se = np.sqrt(2 * np.sum(off ** 2) / n)
    assert abs(hut["trace"] - np.trace(Hr)) < 5 * se + 1e-6
    assert hut["trace_stderr"] == pytest.approx(se, rel=0.2)
    diag = hut["diag"]
    se_diag = np.sqrt(np.sum(off ** 2, axis=1) / n)
    assert np.all(np.abs(diag[keep] - np.diag(Hr)) < 5 * se_diag + 1e-6)
    assert np.all(diag[~keep] == 0)


def test_spectral_density_quadrature():
    op, _, H, keep = _hessian_case(False)
    Hr = H[np.ix_(keep, keep)]
    sd = hessian.spectral_density(op, jax.random.key(4), num_probes=3, num_steps=keep.sum())
    grid = np.asarray(sd["grid"])
    assert np.trapezoid(sd["density"], grid) == pytest.approx(1.0, abs=1e-3)
    eig = np.linalg.eigvalsh(Hr)
    for p, (th, w) in enumerate(zip(sd["nodes"], sd["weights"])):
        assert sum(w) == pytest.approx(1.0, abs=1e-6)
        assert max(th) == pytest.approx(eig[-1], rel=1e-3)
        # Gauss quadrature is exact for f(t) = t: sum_j tau_j theta_j = v^T H v / |v|^2.
        v = np.asarray(jax.random.rademacher(jax.random.fold_in(jax.random.key(4), p),
                                             op.theta.shape, jnp.float32))[keep]
        assert np.dot(w, th) == pytest.approx(v @ Hr @ v / (v @ v), rel=1e-3)


def test_hessian_analyze_summary():
    op, _, H, keep = _hessian_case(False)
    x, y = _data(n=60, seed=1)
    params = op.unravel(op.theta)
    mask = jax.tree.map(lambda m: m > 0, op.unravel(op.mflat))
    summary, diag = hessian.analyze(op.engine, params, {}, mask, x, y, jax.random.key(0),
                                    top_k=2, lanczos_steps=int(keep.sum()), trace_probes=8,
                                    slq_probes=2, batch_size=25)
    assert summary["unpruned_params"] == keep.sum()
    assert summary["top_eigenvalues"][0] == pytest.approx(np.linalg.eigvalsh(
        H[np.ix_(keep, keep)])[-1], rel=1e-3)
    assert len(summary["density"]["nodes"]) == 2 and diag.shape == keep.shape
    assert set(summary["diag_by_layer"]) == {"fc1/kernel", "fc1/bias", "head/kernel", "head/bias"}


# ---------------------------------------------------------------- landscapes


def _layout_params():
    k = jax.random.split(jax.random.key(0), 6)
    params = {"conv": {"kernel": jax.random.normal(k[0], (3, 3, 2, 4)),
                       "bias": jax.random.normal(k[1], (4,))},
              "dense": {"kernel": jax.random.normal(k[2], (5, 3)),
                        "bias": jax.random.normal(k[3], (3,))},
              "norm": {"scale": jnp.ones(4), "bias": jnp.zeros(4)}}
    mask = masks_lib.ones_like(params)
    mask["conv"]["kernel"] = jax.random.bernoulli(k[4], 0.6, (3, 3, 2, 4))
    dm = np.array(jax.random.bernoulli(k[5], 0.6, (5, 3)))
    dm[:, 2] = False  # a fully pruned output unit
    mask["dense"]["kernel"] = jnp.asarray(dm)
    return params, mask


def test_filter_normalisation_per_output_filter():
    params, mask = _layout_params()
    d = jax.tree.map(lambda p: jnp.full_like(p, 0.5) + jnp.arange(p.size).reshape(p.shape) / 7,
                     params)
    out = landscape.filter_normalize(d, params, mask)
    for layer in ("conv", "dense"):
        w = np.asarray(params[layer]["kernel"]) * np.asarray(mask[layer]["kernel"])
        dd = np.asarray(d[layer]["kernel"]) * np.asarray(mask[layer]["kernel"])
        want = np.zeros_like(dd)
        for j in range(w.shape[-1]):  # the last axis: output filters (HWIO, (in, out))
            dn = np.linalg.norm(dd[..., j])
            if dn > 0:
                want[..., j] = dd[..., j] * np.linalg.norm(w[..., j]) / dn
        np.testing.assert_allclose(out[layer]["kernel"], want, rtol=1e-5, atol=1e-7)
        assert np.all(np.asarray(out[layer]["bias"]) == 0)
    assert np.all(np.asarray(out["dense"]["kernel"])[:, 2] == 0)
    assert all(np.all(np.asarray(v) == 0) for v in jax.tree.leaves(out["norm"]))


class _Capture:
    """Stands in for FamilyEvaluator: records every family it is asked to evaluate."""
    eval_batch_size = 16

    def __init__(self):
        self.calls = []

    def evaluate(self, anchors, coeffs, mask, x, y, **kw):
        self.calls.append((anchors, np.asarray(coeffs)))
        g = len(coeffs)
        return {"loss": np.linspace(1, 2, g), "error": np.linspace(0, 1, g)}


def test_landscapes_keep_pruned_weights_zero_and_save_directions(tmp_path):
    params, mask = _layout_params()
    sols = []
    for s in range(3):
        p = jax.tree.map(lambda a, s=s: a + 0.1 * s * jnp.sin(jnp.arange(a.size) * (s + 1))
                         .reshape(a.shape), params)
        sols.append({"params": masks_lib.apply(p, mask), "batch_stats": {}})
    cap = _Capture()
    x = jnp.zeros((4, 1))
    summary, dirs = landscape.analyze(cap, sols, mask, x, None, jax.random.key(3), grid=5,
                                      line_points=7)
    assert {"interpolation", "random_1d", "random_2d", "plane"} <= set(summary)
    assert len(cap.calls) == 4
    pruned = [~np.asarray(m) for m in jax.tree.leaves(mask)]
    for anchors, coeffs in cap.calls:
        for c in coeffs:  # every grid point
            point = family.combine(anchors["params"], jnp.asarray(c, jnp.float32))
            for leaf, off in zip(jax.tree.leaves(point), pruned):
                assert np.all(np.asarray(leaf)[off] == 0)
    for d in dirs:
        for leaf, off in zip(jax.tree.leaves(d), pruned):
            assert np.all(np.asarray(leaf)[off] == 0)
    path = str(tmp_path / "dirs.npz")
    landscape.save_directions(path, dirs, seed=7, purpose=rng.ANALYSIS_LANDSCAPE_DIRS)
    back = landscape.load_directions(path, params)
    chex.assert_trees_all_equal(back, dirs)
    assert int(np.load(path)["seed"]) == 7
    again = landscape.random_directions(jax.random.key(3), sols[0]["params"], mask, 2)
    chex.assert_trees_all_equal(again, dirs)


def test_plane_coordinates_are_orthonormal_gram_schmidt():
    rng = np.random.default_rng(0)
    t = [rng.normal(size=6) for _ in range(3)]
    pts = landscape.plane_coordinates([{"w": jnp.asarray(v)} for v in t])
    u = (t[1] - t[0]) / np.linalg.norm(t[1] - t[0])
    r = (t[2] - t[0]) - np.dot(t[2] - t[0], u) * u
    v = r / np.linalg.norm(r)
    for p, th in zip(pts, t):  # each solution sits at its coordinates
        np.testing.assert_allclose(t[0] + p[0] * u + p[1] * v, th, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(landscape.plane_coefficients(pts, pts[:, 0], pts[:, 1]),
                               np.eye(3), atol=1e-6)
    c = landscape.plane_coefficients(pts, np.array([0.3]), np.array([-0.7]))[0]
    np.testing.assert_allclose(c[0] * t[0] + c[1] * t[1] + c[2] * t[2],
                               t[0] + 0.3 * u - 0.7 * v, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="collinear"):
        landscape.plane_coordinates([{"w": jnp.asarray(t[0] * s)} for s in (1.0, 2.0, 3.0)])


def test_family_combine_is_exact_at_unit_vectors():
    a = {"w": jnp.stack([jnp.full((3,), 0.1), jnp.full((3,), 0.7)])}
    for c, want in (((1.0, 0.0), 0.1), ((0.0, 1.0), 0.7)):
        out = family.combine(a, jnp.asarray(c))
        assert np.all(np.asarray(out["w"]) == np.float32(want))
    sel = {"w": jnp.asarray(0.0)}  # unselected leaves stay at anchor 0
    assert np.all(np.asarray(family.combine(a, jnp.asarray((0.0, 1.0)), sel)["w"])
                  == np.float32(0.1))


def test_replace_report_section():
    from dp_jax.reports import analysis as report
    base = "# Report\n\nbody\n"
    once = report.replace_section(base, "A")
    assert once.startswith(base.rstrip()) and "<!-- analysis -->\nA\n<!-- /analysis -->" in once
    twice = report.replace_section(once + "\ntail\n", "B")
    assert "\nB\n" in twice and "\nA\n" not in twice
    assert twice.count("<!-- analysis -->") == 1 and twice.endswith("tail\n")
    assert report.replace_section("", "C") == "<!-- analysis -->\nC\n<!-- /analysis -->\n"



def test_aggregate_over_seeds_hand_computed():
    from dp_jax.reports.analysis import aggregate
    rows = [dict(run="dp", seed=0, round=2, sparsity=0.51, barrier=0.010, loss_barrier=0.1,
                 top_eigenvalue=4.0, trace=100.0),
            dict(run="dp", seed=1, round=2, sparsity=0.51, barrier=0.030, loss_barrier=0.3,
                 top_eigenvalue=6.0, trace=300.0),
            dict(run="dense", seed=0, round=0, sparsity=0.0, barrier=0.05, loss_barrier=0.2)]
    agg = {(a["run"], a["round"]): a for a in aggregate(rows)}
    dp = agg[("dp", 2)]
    assert dp["seeds"] == [0, 1] and dp["barrier_n"] == 2
    assert dp["barrier_mean"] == pytest.approx(0.02) and dp["barrier_std"] == pytest.approx(0.01)
    assert dp["stable"] == 1  # 1 pp < 2 pp; 3 pp is not
    assert dp["top_eigenvalue_mean"] == pytest.approx(5.0)
    assert dp["trace_std"] == pytest.approx(100.0)
    dense = agg[("dense", 0)]
    assert dense["stable"] == 0 and "trace_mean" not in dense
