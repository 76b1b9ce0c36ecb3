"""train.compute_dtype=bfloat16: the forward/backward really runs in bfloat16, training tracks
float32 within a stated tolerance, and weights, masks, optimiser state and pruned zeros are
float32 and exact -- for real-data training (Trainer), DP's inner loop and MTT's student."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dp_jax import masks
from dp_jax.training import small_set, trainer as train
from dp_jax.tasks import settings as validate
from dp_jax.distill import mtt
from dp_jax.models import create_model, init_variables

from conftest import load_config_module

# Stated tolerance: over 60 SGD steps on this task the bfloat16 loss stays within 0.05 (absolute)
# of the float32 loss at every step; bfloat16 has an 8-bit mantissa (relative error ~0.4 %).
LOSS_TOL = 0.05


def _problem(name="lenet_300_100"):
    cfg = {"name": name} if name == "lenet_300_100" else {"name": name, "width": 4, "depth": 2,
                                                            "norm": "batch"}
    model = create_model(ml_collections.ConfigDict(cfg), num_classes=3)
    v = init_variables(model, jax.random.key(0), (8, 8, 1))
    mask = masks.prune(masks.magnitude_scores(v["params"]), masks.ones_like(v["params"]), 0.5)
    x = jax.random.normal(jax.random.key(1), (96, 8, 8, 1))
    y = (jnp.arange(96) % 3).astype(jnp.int32)
    x = x + 1.5 * jax.nn.one_hot(y, 64).reshape(96, 8, 8, 1)  # learnable: a class-coded pixel
    return model, v, mask, x, y


def _run(model, v, mask, x, y, dtype, steps=60):
    tx = small_set.sgd(0.1, num_steps=steps)
    step = jax.jit(lambda s, xb, yb, k: train.train_step(s, xb, yb, k, model=model, tx=tx,
                                                         compute_dtype=dtype))
    state, losses = train.create_state(v, mask, tx), []
    for t in range(steps):
        idx = small_set.batch_at(jax.random.key(2), t, x.shape[0], 32)
        state, m = step(state, x[idx], y[idx], jax.random.key(t))
        losses.append(float(m["loss"]))
    return state, np.array(losses)


@pytest.mark.parametrize("name", ["lenet_300_100", "convnet"])
def test_bfloat16_training_tracks_float32_and_keeps_float32_state(name):
    model, v, mask, x, y = _problem(name)
    s32, l32 = _run(model, v, mask, x, y, "float32")
    s16, l16 = _run(model, v, mask, x, y, "bfloat16")
    assert np.all(np.isfinite(l16)) and l16[-10:].mean() < 0.75 * l16[:10].mean()  # it learns
    assert np.max(np.abs(l16 - l32)) < LOSS_TOL
    assert not np.array_equal(l16, l32)  # ... and it is not float32 in disguise
    for tree in (s16.params, s16.opt_state, s16.batch_stats):
        assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(tree)
                   if jnp.issubdtype(a.dtype, jnp.floating))
    for p, m in zip(jax.tree.leaves(s16.params), jax.tree.leaves(mask)):
        assert np.all(np.asarray(p)[~np.asarray(m)] == 0.0)


def test_bfloat16_step_computes_its_matrix_products_in_bfloat16():
    model, v, mask, x, y = _problem()
    tx = small_set.sgd(0.05, num_steps=1)
    state = train.create_state(v, mask, tx)
    jaxprs = {dt: str(jax.make_jaxpr(lambda s: train.train_step(
        s, x[:8], y[:8], jax.random.key(0), model=model, tx=tx, compute_dtype=dt))(state))
        for dt in ("float32", "bfloat16")}
    dots = lambda text: [ln for ln in text.splitlines() if "dot_general" in ln]  # noqa: E731
    assert dots(jaxprs["bfloat16"]) and all("bf16" in ln for ln in dots(jaxprs["bfloat16"]))
    assert "bf16" not in jaxprs["float32"]


def test_dp_inner_loop_in_bfloat16_keeps_pruned_weights_zero():
    model, v, mask, x, y = _problem()
    out = {}
    for dt in ("float32", "bfloat16"):
        recipe = small_set.Recipe(lr=0.05, steps=40, batch_size=32, compute_dtype=dt)
        fn = small_set.make_inner_train(model, recipe, x.shape[0], None)
        params, loss = fn(v, mask, x, y, jax.random.split(jax.random.key(3), 2))
        out[dt] = (params, np.asarray(loss))
        for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask)):
            assert p.dtype == jnp.float32 and np.all(np.asarray(p)[:, ~np.asarray(m)] == 0.0)
    assert np.max(np.abs(out["bfloat16"][1] - out["float32"][1])) < LOSS_TOL


def test_mtt_student_step_in_bfloat16_is_close_to_float32():
    model, v, mask, x, y = _problem()
    theta = masks.apply(v["params"], mask)
    steps = {dt: mtt.make_student_step(model, batch_size=32, augment=None, compute_dtype=dt)
             for dt in ("float32", "bfloat16")}
    new = {dt: f(theta, x, y, jnp.log(0.1), mask, jax.random.key(4), jnp.int32(0), {})
           for dt, f in steps.items()}
    flat = {dt: np.concatenate([np.ravel(a) for a in jax.tree.leaves(t)]) for dt, t in new.items()}
    moved = {dt: flat[dt] - np.concatenate([np.ravel(a) for a in jax.tree.leaves(theta)])
             for dt in flat}
    rel = np.linalg.norm(moved["bfloat16"] - moved["float32"]) / np.linalg.norm(moved["float32"])
    assert 0 < rel < 0.05
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(new["bfloat16"]))


def test_unknown_compute_dtype_is_refused_naming_the_field():
    c = load_config_module("fashion_mnist").get_config()
    c.train.compute_dtype = "float16"
    with pytest.raises(ValueError, match=r"train\.compute_dtype.*float32 \| bfloat16"):
        validate.parse(c).specs
