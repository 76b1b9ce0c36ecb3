"""Small-set training (dp_jax.training.small_set): CutMix against a NumPy reference, the recipe in
epochs, loop forms taking identical steps, and DP's inner loop with the paper's recipe."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from dp_jax.tasks import prune as experiment
from dp_jax.storage import fileio
from dp_jax.training import small_set, trainer as train
from dp_jax.rundir import paths as workdir
from dp_jax.data import cutmix as cutmix_lib
from dp_jax.models import create_model, init_variables

from conftest import assert_rejected, make_distilled


def _reference_cutmix(key, x, y, num_classes, prob, beta):
    """The CutMix-PyTorch rule in NumPy, given the same random draws."""
    k_apply, k_lam, k_perm, k_box = jax.random.split(key, 4)
    k_r, k_c = jax.random.split(k_box)
    n, h, w = x.shape[:3]
    lam = float(jax.random.beta(k_lam, beta, beta))
    perm = np.asarray(jax.random.permutation(k_perm, n))
    cr, cc = int(jax.random.randint(k_r, (), 0, h)), int(jax.random.randint(k_c, (), 0, w))
    onehot = np.eye(num_classes, dtype=np.float32)[y]
    if not float(jax.random.uniform(k_apply)) < prob:
        return x, onehot
    cut_h, cut_w = int(h * np.sqrt(1 - lam)), int(w * np.sqrt(1 - lam))
    r1, r2 = np.clip(cr - cut_h // 2, 0, h), np.clip(cr + cut_h // 2, 0, h)
    c1, c2 = np.clip(cc - cut_w // 2, 0, w), np.clip(cc + cut_w // 2, 0, w)
    out = x.copy()
    out[:, r1:r2, c1:c2] = x[perm, r1:r2, c1:c2]
    ratio = 1 - (r2 - r1) * (c2 - c1) / (h * w)
    return out, ratio * onehot + (1 - ratio) * onehot[perm]


@pytest.mark.parametrize("seed", range(6))
def test_cutmix_matches_the_reference_rule(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(8, 9, 7, 2)).astype(np.float32)
    y = rng.integers(0, 4, 8)
    key = jax.random.key(seed)
    got_x, got_y = cutmix_lib.cutmix(key, jnp.asarray(x), jnp.asarray(y), 4, prob=0.7, beta=1.0)
    want_x, want_y = _reference_cutmix(key, x, y, 4, 0.7, 1.0)
    np.testing.assert_array_equal(np.asarray(got_x), want_x)
    np.testing.assert_allclose(np.asarray(got_y), want_y, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(got_y).sum(1), 1.0, rtol=1e-6)


def test_cutmix_probability_zero_and_one():
    x = jnp.arange(4 * 6 * 6, dtype=jnp.float32).reshape(4, 6, 6, 1)
    y = jnp.array([0, 1, 2, 3])
    mixed = 0
    for s in range(20):
        xo, yo = cutmix_lib.cutmix(jax.random.key(s), x, y, 4, prob=0.0, beta=1.0)
        np.testing.assert_array_equal(np.asarray(xo), np.asarray(x))
        np.testing.assert_array_equal(np.asarray(yo), np.eye(4)[np.asarray(y)])
        xo, yo = cutmix_lib.cutmix(jax.random.key(s), x, y, 4, prob=1.0, beta=1.0)
        mixed += int(not np.array_equal(np.asarray(xo), np.asarray(x)))  # a box was pasted
    assert mixed >= 15


def test_soft_label_loss_is_the_two_term_cutmix_loss():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 4)).astype(np.float32)
    a, b, ratio = rng.integers(0, 4, 5), rng.integers(0, 4, 5), 0.37
    soft = ratio * np.eye(4)[a] + (1 - ratio) * np.eye(4)[b]
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    want = ratio * -logp[np.arange(5), a].mean() + (1 - ratio) * -logp[np.arange(5), b].mean()
    got = float(train.cross_entropy(jnp.asarray(logits), jnp.asarray(soft)))
    assert got == pytest.approx(want, rel=1e-6)


def test_recipe_in_epochs_and_its_optimiser():
    r = small_set.Recipe(lr=0.01, steps=7, epochs=3, batch_size=64, decay_at=(2 / 3, 5 / 6),
                         decay_factor=0.2)
    assert r.num_steps(100) == 3 * 1 and r.num_steps(300) == 3 * 4 and r.batch(30) == 30
    assert small_set.Recipe(lr=0.01, steps=7).num_steps(100) == 7
    assert r.examples(300) == 12 * 64
    # lr x0.2 at 2/3 and again at 5/6 of the 12 steps: plain SGD steps reveal the schedule.
    tx = small_set.Recipe(lr=1.0, epochs=3, batch_size=64, momentum=0.0, weight_decay=0.0,
                          decay_at=(2 / 3, 5 / 6), decay_factor=0.2).optimizer(300)
    p, state, got = jnp.zeros(()), None, []
    state = tx.init(p)
    for _ in range(12):
        upd, state = tx.update(jnp.ones(()), state, p)
        got.append(-float(upd))
    np.testing.assert_allclose(got, [1.0] * 8 + [0.2] * 2 + [0.04] * 2, rtol=1e-6)


def _tiny():
    model = create_model(ml_collections.ConfigDict({"name": "lenet_300_100"}), num_classes=3)
    v = init_variables(model, jax.random.key(0), (6, 6, 1))
    x = jax.random.normal(jax.random.key(1), (12, 6, 6, 1))
    y = jnp.arange(12) % 3
    mask = jax.tree.map(lambda a: jnp.ones(a.shape, bool), v["params"])
    return model, v, x, y, mask


def test_cutmix_inner_loop_forms_take_identical_steps():
    model, v, x, y, mask = _tiny()
    recipe = small_set.Recipe(lr=0.05, steps=6, batch_size=4, cutmix_prob=0.5)
    keys = jax.random.split(jax.random.key(3), 2)
    scan = small_set.make_inner_train(model, recipe, 12, None, loop="scan", num_classes=3)
    py = small_set.make_inner_train(model, recipe, 12, None, loop="python", num_classes=3)
    plain = small_set.make_inner_train(model, small_set.Recipe(lr=0.05, steps=6, batch_size=4),
                                       12, None, loop="scan")
    (ps, ls), (pp, lp), (p0, _) = [f(v, mask, x, y, keys) for f in (scan, py, plain)]
    for a, b in zip(jax.tree.leaves(ps), jax.tree.leaves(pp)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ls), np.asarray(lp), rtol=1e-5)
    diff = sum(float(optax.tree.norm(jax.tree.map(jnp.subtract, a, b)))
               for a, b in zip(jax.tree.leaves(ps), jax.tree.leaves(p0)))
    assert diff > 1e-4  # CutMix changed the training


def test_dp_with_the_paper_recipe_end_to_end(tiny_config, tmp_path):
    c = tiny_config
    c.prune.method = "dp"
    c.prune.rounds = 1
    c.distill.path = make_distilled(c, str(tmp_path / "set.npz"), per_class=4)  # 40 images
    c.dp.epochs = 5
    c.dp.batch_size = 16
    c.dp.cutmix_prob = 0.5
    wd = str(tmp_path / "wd")
    experiment.run(c, wd)
    rows = fileio.read_jsonl(workdir.rounds_path(wd))
    # 5 epochs of 40 // 16 = 2 batches of 16, per inner seed.
    assert rows[-1]["train_examples"] == 5 * 2 * 16 * c.dp.inner_seeds


@pytest.mark.parametrize("field,value,match", [
    ("dp.epochs", -1, "dp.epochs"), ("dp.cutmix_prob", 1.5, r"\[0, 1\]"),
    ("dp.cutmix_beta", 0.0, "> 0")])
def test_bad_recipe_values_are_rejected(tiny_config, tmp_path, field, value, match):
    tiny_config.prune.method = "dp"
    assert_rejected(tiny_config, field, value, match, tmp_path / "wd")
