"""Masked training: NumPy reference step, exact zeros, loop forms, resume, evaluation, no retracing."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from dp_jax.training import optimizers
from dp_jax import masks
from dp_jax.training.settings import TrainSettings
from dp_jax.training import small_set
from dp_jax.training import trainer as train
from dp_jax.training.outputs import TrainingDivergedError
from dp_jax.models import create_model, init_variables


LAYERS = ("fc1", "fc2", "head")


def lenet():
    return create_model(ml_collections.ConfigDict({"name": "lenet_300_100"}), num_classes=10)


def numpy_lenet_grads(p, m, x, y):
    """Hand-written forward/backward of LeNet-300-100 with masked kernels (mean CE)."""
    h = x.reshape(len(x), -1).astype(np.float64)
    W = [np.asarray(p[LAYERS[i]]["kernel"], np.float64) * m[i] for i in range(3)]
    b = [np.asarray(p[LAYERS[i]]["bias"], np.float64) for i in range(3)]
    z1 = h @ W[0] + b[0]; a1 = np.maximum(z1, 0)
    z2 = a1 @ W[1] + b[1]; a2 = np.maximum(z2, 0)
    z3 = a2 @ W[2] + b[2]
    e = np.exp(z3 - z3.max(1, keepdims=True)); s = e / e.sum(1, keepdims=True)
    d3 = s.copy(); d3[np.arange(len(y)), y] -= 1; d3 /= len(y)
    d2 = (d3 @ W[2].T) * (z2 > 0)
    d1 = (d2 @ W[1].T) * (z1 > 0)
    gW = [h.T @ d1 * m[0], a1.T @ d2 * m[1], a2.T @ d3 * m[2]]
    gb = [d1.sum(0), d2.sum(0), d3.sum(0)]
    return gW, gb


def test_masked_sgd_step_matches_numpy_reference():
    model = lenet()
    v = init_variables(model, jax.random.key(0), (3, 3, 1))
    rng = np.random.default_rng(0)
    mask = masks.prune(masks.random_scores(v["params"], jax.random.key(1)),
                       masks.ones_like(v["params"]), 0.6)
    m = [np.asarray(mask[LAYERS[i]]["kernel"]) for i in range(3)]
    lr, mom, wd = 0.1, 0.9, 5e-3
    tx = optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr, momentum=mom))
    state = train.create_state(v, mask, tx)
    x = rng.normal(size=(8, 3, 3, 1)).astype(np.float32)
    y = rng.integers(0, 10, size=8)
    step = jax.jit(functools.partial(train.train_step, model=model, tx=tx))
    # NumPy reference of torch-style SGD: buf = mom*buf + (g + wd*w); w -= lr*buf; masked.
    P = {LAYERS[i]: {k: np.asarray(v["params"][LAYERS[i]][k], np.float64)
                     for k in ("kernel", "bias")} for i in range(3)}
    for i in range(3):
        P[LAYERS[i]]["kernel"] *= m[i]
    buf = {k: {kk: np.zeros_like(vv) for kk, vv in d.items()} for k, d in P.items()}
    for _ in range(3):
        state, _ = step(state, jnp.asarray(x), jnp.asarray(y), jax.random.key(0))
        gW, gb = numpy_lenet_grads(P, m, x, y)
        for i in range(3):
            L = P[LAYERS[i]]
            for k, g in (("kernel", gW[i]), ("bias", gb[i])):
                buf[LAYERS[i]][k] = mom * buf[LAYERS[i]][k] + g + wd * L[k]
                L[k] = L[k] - lr * buf[LAYERS[i]][k]
            L["kernel"] *= m[i]
    for i in range(3):
        for k in ("kernel", "bias"):
            np.testing.assert_allclose(np.asarray(state.params[LAYERS[i]][k]),
                                       P[LAYERS[i]][k], rtol=2e-4, atol=2e-6)


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_pruned_weights_stay_exactly_zero(optimizer):
    model = lenet()
    v = init_variables(model, jax.random.key(0), (4, 4, 1))
    mask = masks.prune(masks.magnitude_scores(v["params"]), masks.ones_like(v["params"]), 0.7)
    cfg = TrainSettings.from_config(optimizer=optimizer, lr=0.05, momentum=0.9,
                                    weight_decay=1e-2, schedule="constant")
    tx = optimizers.make_optimizer(cfg, 100)
    x = jax.random.normal(jax.random.key(1), (64, 4, 4, 1))
    y = jnp.arange(64) % 10
    tr = train.Trainer(model, tx, batch_size=16, num_train=64, loop="scan")
    state, _ = tr.train(train.create_state(v, mask, tx), x, y, jax.random.key(2), 40)
    for k, leaf in masks.prunable_leaves(state.params).items():
        mk = np.asarray(masks.prunable_leaves(mask)[k])
        assert np.all(np.asarray(leaf)[~mk] == 0.0), k
        assert np.any(np.asarray(leaf)[mk] != np.asarray(masks.prunable_leaves(v["params"])[k])[mk])


def _toy(n=96, shape=(4, 4, 1), seed=0):
    kx, ky = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (n,) + shape)
    w = jax.random.normal(ky, (int(np.prod(shape)), 10))
    return x, jnp.argmax(x.reshape(n, -1) @ w, -1)


@pytest.mark.parametrize("model_cfg", [
    {"name": "lenet_300_100"},
    {"name": "convnet", "width": 4, "depth": 1, "norm": "batch"},
])
def test_loop_forms_agree_resume_and_snapshots(model_cfg):
    model = create_model(ml_collections.ConfigDict(model_cfg), num_classes=10)
    x, y = _toy(shape=(4, 4, 1))
    v = init_variables(model, jax.random.key(0), (4, 4, 1))
    mask = masks.ones_like(v["params"])
    tx = optax.sgd(0.05, momentum=0.9)
    key = jax.random.key(3)
    ends = {}
    for loop in ("scan", "python"):
        tr = train.Trainer(model, tx, batch_size=32, num_train=96, loop=loop)
        full, snaps = tr.train(train.create_state(v, mask, tx), x, y, key, 13, snapshot_steps=[4])
        # Stop mid-epoch and continue: same trajectory as one call.
        half, _ = tr.train(train.create_state(v, mask, tx), x, y, key, 7)
        resumed, _ = tr.train(half, x, y, key, 13)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                     full.params, resumed.params)
        to4, _ = tr.train(train.create_state(v, mask, tx), x, y, key, 4)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                     snaps[4]["params"], to4.params)
        assert int(full.step) == 13
        ends[loop] = full.params
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 ends["scan"], ends["python"])


def test_it_learns_and_compiles_once():
    model = lenet()
    x, y = _toy(n=256)
    v = init_variables(model, jax.random.key(0), (4, 4, 1))
    tx = optax.sgd(0.05, momentum=0.9)
    tr = train.Trainer(model, tx, batch_size=32, num_train=256, loop="python")
    losses = []
    for r in range(3):  # new mask and weights each "round": no recompilation
        mask = masks.prune(masks.random_scores(v["params"], jax.random.key(r)),
                           masks.ones_like(v["params"]), 0.3)
        state, _ = tr.train(train.create_state(v, mask, tx), x, y, jax.random.key(r), 48,
                            on_epoch=lambda e, m: losses.append(m["loss"]))
    assert tr._programs[False][2]._cache_size() == 1  # the jitted step
    assert losses[5] < 0.7 * losses[0]


def test_evaluate_counts_every_example():
    model = lenet()
    x, y = _toy(n=103)
    v = init_variables(model, jax.random.key(0), (4, 4, 1))
    mask = masks.ones_like(v["params"])
    tr = train.Trainer(model, optax.sgd(0.1), batch_size=8, num_train=103, eval_batch_size=25)
    ev = tr.evaluate(v["params"], {}, mask, x, y)
    logits = model.apply(v, x, train=False)
    ref_acc = float(np.mean(np.argmax(np.asarray(logits), -1) == np.asarray(y)))
    ref_loss = float(np.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y)))
    assert ev["accuracy"] == pytest.approx(ref_acc, abs=1e-7)
    assert ev["loss"] == pytest.approx(ref_loss, rel=1e-5)


def test_divergence_is_reported_with_steps():
    model = lenet()
    x, y = _toy(n=64)
    x = x.at[3].set(jnp.nan)
    v = init_variables(model, jax.random.key(0), (4, 4, 1))
    tr = train.Trainer(model, optax.sgd(0.1), batch_size=64, num_train=64)
    with pytest.raises(TrainingDivergedError, match="step 0"):
        tr.train(train.create_state(v, masks.ones_like(v["params"]), optax.sgd(0.1)),
                 x, y, jax.random.key(0), 2, on_epoch=lambda e, m: None)


def test_schedules():
    cfg = TrainSettings.from_config(lr=1.0, schedule="multistep", decay_at=(0.5, 0.75),
                                    decay_factor=0.1)
    s = optimizers.make_schedule(cfg, 100)
    assert [float(s(t)) for t in (0, 49, 50, 74, 75, 99)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01])
    cfg = cfg.replace(schedule="bogus")
    with pytest.raises(ValueError, match="train.schedule"):
        optimizers.make_schedule(cfg, 100)


def test_inner_loop_vmaps_over_seeds():
    model = lenet()
    x, y = _toy(n=40)
    v = init_variables(model, jax.random.key(0), (4, 4, 1))
    mask = masks.ones_like(v["params"])
    fn = small_set.make_inner_loop(model, optax.sgd(0.05, momentum=0.9), num_steps=12, batch_size=10)
    keys = jax.random.split(jax.random.key(1), 3)
    batched, m = jax.jit(jax.vmap(fn, in_axes=(None, None, None, None, 0)))(v, mask, x, y, keys)
    assert m["loss"].shape == (3, 12)
    single, _ = jax.jit(fn)(v, mask, x, y, keys[1])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[1], b, rtol=1e-4, atol=1e-5),
                 batched.params, single.params)
    chunked, _ = jax.jit(small_set.make_inner_loop(model, optax.sgd(0.05, momentum=0.9), num_steps=12,
                                               batch_size=10, chunk=4))(v, mask, x, y, keys[1])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 chunked.params, single.params)


@pytest.mark.slow  # ~60 s compiling DSA twice; the CutMix loop-form test covers the same path
def test_python_driven_inner_loop_takes_the_scan_steps():
    # The Python-driven form (the fast one for conv nets on CPU) must train exactly as the
    # one-program scan: same minibatches, augmentations and updates, per seed.
    from dp_jax.data.augment import make_augment
    model = lenet()
    x, y = _toy(n=40)
    v = init_variables(model, jax.random.key(0), (4, 4, 1))
    mask = masks.prune(masks.magnitude_scores(v["params"]), masks.ones_like(v["params"]), 0.5)
    tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.05, momentum=0.9))
    aug = make_augment("dsa")
    keys = jax.random.split(jax.random.key(1), 2)
    scan = jax.jit(jax.vmap(small_set.make_inner_loop(model, tx, num_steps=12, batch_size=10,
                                                  augment=aug), in_axes=(None, None, None, None, 0)))
    ref, m_ref = scan(v, mask, x, y, keys)
    for chunk in (0, 4):
        traces = []

        def counting_aug(key, xb):  # runs once per traced step: counts compilations
            traces.append(1)
            return aug(key, xb)
        fn = small_set.make_inner_python(model, tx, num_steps=12, batch_size=10,
                                     augment=counting_aug, chunk=chunk)
        fn(v, mask, x, y, keys)
        got, m = fn(v, mask, x, y, keys)
        assert len(traces) == max(chunk, 1)  # one program, traced once, for all calls
        assert m["loss"].shape == (2, 12)
        np.testing.assert_allclose(m["loss"], m_ref["loss"], rtol=1e-4, atol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                     got.params, ref.params)
        jax.tree.map(lambda a, m_: np.testing.assert_array_equal(np.asarray(a)[:, np.asarray(m_) == 0], 0),
                     got.params, mask)


def test_auto_loop_picks_scan_for_stride1_conv_nets_on_cpu():
    # Stride-1 conv nets go through dp_jax.models.convs inside the scan; ResNets (strided
    # convolutions) keep the Python loop on CPU. Asked twice: cached init programs must not
    # hide the model's convolutions from the check.
    from dp_jax.models import create_model
    assert jax.default_backend() == "cpu"
    for cfg, want in ((dict(name="convnet", width=4, depth=2), "scan"),
                      (dict(name="resnet18", width=4), "python"),
                      (dict(name="lenet_300_100"), "scan")):
        model = create_model(ml_collections.ConfigDict(cfg), num_classes=10)
        for _ in range(2):  # shapes suffice: no init program is compiled
            v = jax.eval_shape(lambda k: init_variables(model, k, (8, 8, 1)), jax.random.key(0))
            assert train.resolve_loop("auto", v["params"], model, (8, 8, 1)) == want, cfg
        assert train.resolve_loop("python", v["params"], model, (8, 8, 1)) == "python"
