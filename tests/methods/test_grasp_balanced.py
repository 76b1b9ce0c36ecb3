"""``grasp:balanced``: GraSP scored on class-balanced minibatches (the authors' data draw),
against batches picked by hand from the same permutation and scores computed on them."""

import jax
import numpy as np
import pytest

from dp_jax import masks, methods, rng
from dp_jax.methods import saliency, scored
from dp_jax.pruning import dense as dense_lib
from dp_jax.pruning import rounds as prune_lib
from dp_jax.pruning import setup as setup_lib
from dp_jax.tasks import settings as settings_lib

from conftest import load_config_module


def _config(toy_npz, method="grasp:balanced", batch=40):
    c = load_config_module("fashion_mnist").get_config("smoke")
    c.data.name, c.data.train_size = f"npz:{toy_npz}", 0
    c.train.batch_size, c.train.epochs, c.train.eval_batch_size = batch, 1, 64
    c.prune.method, c.prune.rounds, c.prune.fraction, c.prune.score_batches = method, 1, 0.5, 2
    return c


@pytest.fixture(scope="module")
def built(toy_npz):
    s = settings_lib.parse(_config(toy_npz))
    return s, setup_lib.build_setup(s, setup_lib.load_data(s))


def _hand_batches(setup, key, num):
    """The first B/C images of every class in the key's permutation, then the next B/C, ..."""
    y = np.asarray(setup.y_train)
    perm = np.asarray(jax.random.permutation(key, len(y)))
    per = setup.trainer.batch_size // setup.num_classes
    out = []
    for i in range(num):
        idx = []
        for c in range(setup.num_classes):
            idx += [j for j in perm if y[j] == c][i * per:(i + 1) * per]
        out.append(np.array(idx))
    return out


def test_balanced_batches_hold_every_class_equally_and_match_a_hand_draw(built):
    _, setup = built
    key = jax.random.key(7)
    got = scored.score_batches(setup, key, 3, balanced=True)
    want = _hand_batches(setup, key, 3)
    seen = set()
    for (x, y), idx in zip(got, want):
        assert np.bincount(np.asarray(y), minlength=10).tolist() == [4] * 10
        np.testing.assert_array_equal(np.asarray(x), np.asarray(setup.x_train)[idx])
        assert not seen & set(idx.tolist())  # distinct images across the batches
        seen |= set(idx.tolist())
    with pytest.raises(ValueError, match="classes .* have fewer"):
        scored.score_batches(setup, key, 6, balanced=True)  # 24 per class; 20 exist


def test_plan_scores_the_balanced_batches(built, tmp_path):
    s, setup = built
    spec = s.specs[0]
    assert spec.label == "grasp_balanced"
    dense = dense_lib.dense_run(setup, str(tmp_path), 0, [])
    ctx = methods.Context(setup=setup, workdir=str(tmp_path), seed=0, seed_key=rng.seed_key(0),
                          dense=dense, config=s)
    plan = methods.get("grasp").plan(spec, ctx)
    ones = masks.ones_like(dense["variables"]["params"])
    got = plan.next_mask(1, ones, dense["trained"])
    key = jax.random.fold_in(jax.random.fold_in(rng.seed_key(0), rng.SCORE), 1)
    batches = [(setup.x_train[i], setup.y_train[i]) for i in _hand_batches(setup, key, 2)]
    want = prune_lib.prune_step(setup, saliency.grasp_scores(
        setup.model, dense["variables"], ones, batches), ones)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert plan.search_examples(1) == 2 * 40


def test_labels_names_and_bad_batch_size(toy_npz):
    labels = [sp.label for sp in settings_lib.parse(_config(
        toy_npz, "grasp,grasp:oneshot;balanced,grasp:balanced")).specs]
    assert labels == ["grasp", "grasp_oneshot_balanced", "grasp_balanced"]
    assert methods.pretty("grasp_oneshot_balanced") == "GraSP (one-shot, class-balanced batch)"
    assert methods.pretty("grasp_balanced") == "GraSP (class-balanced batch)"
    s = settings_lib.parse(_config(toy_npz, batch=8))
    with pytest.raises(ValueError, match="grasp:balanced needs train.batch_size=8 >= the 10"):
        settings_lib.validate_with_data(s, setup_lib.load_data(s))


def test_a_batch_size_not_a_multiple_of_the_classes_rounds_down(toy_npz):
    s = settings_lib.parse(_config(toy_npz, batch=45))
    setup = setup_lib.build_setup(s, setup_lib.load_data(s))
    assert scored.balanced_size(128, 10) == 120 and scored.balanced_size(45, 10) == 40
    key = jax.random.key(3)
    for (x, y), idx in zip(scored.score_batches(setup, key, 2, balanced=True),
                           _hand_batches(setup, key, 2)):
        assert np.bincount(np.asarray(y), minlength=10).tolist() == [4] * 10
        np.testing.assert_array_equal(np.asarray(x), np.asarray(setup.x_train)[idx])
