"""Each seed's dense run (dp_jax/pruning/dense.py): trained once, snapshots at rewind steps,
restored (never retrained), missing rewind steps recomputed, seeds as one program.

The reference for a snapshot at step k is an independent training that stops at k.
"""

import dataclasses

import jax
import numpy as np
import pytest

from dp_jax import masks as masks_lib
from dp_jax import rng
from dp_jax.pruning import dense as dense_lib
from dp_jax.pruning import rounds as prune_lib
from dp_jax.pruning import setup as setup_lib
from dp_jax.pruning.records import without_timings
from dp_jax.tasks import settings as settings_lib
from dp_jax.training import trainer as train_lib

from conftest import load_config_module


@pytest.fixture(scope="module")
def setup(toy_npz):
    c = load_config_module("fashion_mnist").get_config("smoke")
    c.data.name, c.data.train_size = f"npz:{toy_npz}", 0
    c.train.batch_size, c.train.epochs, c.train.eval_batch_size = 40, 2, 64
    c.prune.method = "imp"
    s = settings_lib.parse(c)
    return setup_lib.build_setup(s, setup_lib.load_data(s))


def _leaves(tree):
    return [np.asarray(v) for v in jax.tree.leaves(tree)]


def _assert_same(a, b, **tol):
    la, lb = _leaves(a), _leaves(b)
    assert len(la) == len(lb) and la
    for x, y in zip(la, lb):
        if tol:
            np.testing.assert_allclose(x, y, **tol)
        else:
            np.testing.assert_array_equal(x, y)


def _trained_until(setup, seed, k):
    """The seed's dense network trained from init up to step k (no snapshots)."""
    v = setup.init_fn(rng.key_for(seed, rng.INIT))
    state = train_lib.create_state(v, masks_lib.ones_like(v["params"]), setup.tx)
    state, _ = setup.trainer.train(state, setup.x_train, setup.y_train,
                                   rng.key_for(seed, rng.DATA), k)
    return {"params": state.params, "batch_stats": state.batch_stats}


def _numpy_eval(params, x, y):
    """Accuracy and mean cross-entropy of dense LeNet-300-100 in float64 NumPy."""
    p = {k: {n: np.asarray(a, np.float64) for n, a in v.items()} for k, v in params.items()}
    h = np.asarray(x, np.float64).reshape(len(x), -1)
    for name in ("fc1", "fc2"):
        h = np.maximum(h @ p[name]["kernel"] + p[name]["bias"], 0)
    z = h @ p["head"]["kernel"] + p["head"]["bias"]
    z = z - z.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    y = np.asarray(y)
    return float(np.mean(z.argmax(1) == y)), float(-logp[np.arange(len(y)), y].mean())


@pytest.fixture(scope="module")
def first(setup, tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("dense"))
    return wd, dense_lib.dense_run(setup, wd, 0, [0, 3, 7, 3])


def _no_training(monkeypatch):
    def refuse(*a, **kw):
        raise AssertionError("a finished dense run was trained again")
    monkeypatch.setattr(prune_lib, "train_and_eval", refuse)


def test_dense_run_snapshots_equal_trainings_that_stop_there(setup, first):
    """Snapshots at k = 3, 7 (0 dropped) equal trainings stopped at k; final weights equal too."""
    _, got = first
    assert sorted(got["snapshots"]) == [3, 7]
    for k in (3, 7):
        _assert_same(got["snapshots"][k], _trained_until(setup, 0, k))
    _assert_same(got["trained"], _trained_until(setup, 0, setup.num_steps))
    _assert_same(got["variables"], setup.init_fn(rng.key_for(0, rng.INIT)))
    # The snapshots are weights of the run, not its init: training moved them.
    assert not np.allclose(_leaves(got["snapshots"][3])[0], _leaves(got["variables"])[0])


def test_dense_record_counts_and_accuracy(setup, first):
    """The dense record's counts by hand, and its accuracy and loss from a NumPy forward pass."""
    _, got = first
    r = got["record"]
    n = 64 * 300 + 300 * 100 + 100 * 10
    assert (r["method"], r["base_method"], r["round"], r["seed"], r["rewind_step"]) == \
        ("dense", "dense", 0, 0, 0)
    assert (r["sparsity"], r["remaining_weights"], r["prunable_weights"]) == (0.0, n, n)
    assert r["train_examples"] == 10 * 40 == setup.num_steps * setup.trainer.batch_size
    acc, loss = _numpy_eval(got["trained"]["params"], setup.x_test, setup.y_test)
    assert r["test_accuracy"] == pytest.approx(acc, abs=1e-6)
    assert r["test_loss"] == pytest.approx(loss, rel=1e-4)
    assert 0 <= r["train_accuracy"] <= 1 and r["wall_s"] > 0


def test_finished_dense_run_is_restored_not_retrained(setup, first, tmp_path, monkeypatch):
    """A second dense_run restores the checkpoint bit for bit, without training."""
    wd, ref = first
    _no_training(monkeypatch)
    got = dense_lib.dense_run(setup, wd, 0, [7])
    assert got["record"] == ref["record"]  # the stored record, timings included
    _assert_same(got["trained"], ref["trained"])
    assert sorted(got["snapshots"]) == [3, 7]
    for k in (3, 7):
        _assert_same(got["snapshots"][k], ref["snapshots"][k])
    assert dense_lib.restore(setup, str(tmp_path), 0, [3]) is None  # a fresh workdir


def test_missing_rewind_step_is_recomputed_and_kept(setup, tmp_path, monkeypatch):
    """A rewind step added later is retrained exactly, stored, then restored; streams refuse."""
    wd = str(tmp_path)
    ref = dense_lib.dense_run(setup, wd, 0, [3])
    with pytest.raises(ValueError, match="streamed"):
        dense_lib.restore(dataclasses.replace(setup, stream=object()), wd, 0, [3, 6])
    _no_training(monkeypatch)
    got = dense_lib.dense_run(setup, wd, 0, [3, 6])
    assert sorted(got["snapshots"]) == [3, 6] and got["record"] == ref["record"]
    _assert_same(got["snapshots"][6], _trained_until(setup, 0, 6))
    _assert_same(got["snapshots"][3], ref["snapshots"][3])
    _assert_same(got["trained"], ref["trained"])

    def refuse(*a, **kw):
        raise AssertionError("retrained a stored snapshot")
    monkeypatch.setattr(setup.trainer, "train", refuse)
    again = dense_lib.restore(setup, wd, 0, [6])
    _assert_same(again["snapshots"][6], got["snapshots"][6])


def test_dense_runs_equal_each_seeds_own_dense_run(setup, first, tmp_path, monkeypatch):
    """dense_runs gives each seed what dense_run gives it alone, and restores finished seeds."""
    wd = str(tmp_path)
    group = dense_lib.dense_runs(setup, wd, [0, 1], [3])
    alone = [first[1], dense_lib.dense_run(setup, str(tmp_path / "alone"), 1, [3])]
    for g, a in zip(group, alone):
        _assert_same(g["variables"], a["variables"])
        _assert_same(g["trained"], a["trained"], rtol=1e-4, atol=1e-5)
        _assert_same(g["snapshots"][3], a["snapshots"][3], rtol=1e-4, atol=1e-5)
        ga, aa = without_timings(g["record"]), without_timings(a["record"])
        assert ga.pop("test_loss") == pytest.approx(aa.pop("test_loss"), abs=1e-4)
        assert ga.pop("train_accuracy") == pytest.approx(aa.pop("train_accuracy"), abs=1e-6)
        assert ga.pop("test_accuracy") == pytest.approx(aa.pop("test_accuracy"), abs=0.02)
        assert ga == aa
    assert group[0]["record"]["seed"] == 0 and group[1]["record"]["seed"] == 1
    assert not np.allclose(_leaves(group[0]["trained"])[0], _leaves(group[1]["trained"])[0])
    _no_training(monkeypatch)
    from dp_jax.pruning import seeds as seed_groups

    def refuse(*a, **kw):
        raise AssertionError("a finished seed was trained again")
    monkeypatch.setattr(seed_groups, "train_and_eval_seeds", refuse)
    again = dense_lib.dense_runs(setup, wd, [1, 0], [3])
    assert [r["record"] for r in again] == [group[1]["record"], group[0]["record"]]
    _assert_same(again[0]["trained"], group[1]["trained"])
