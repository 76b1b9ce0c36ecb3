"""The round engine (dp_jax/pruning/rounds.py) and its records (dp_jax/pruning/records.py).

References are independent of the code under test: masks by a NumPy global magnitude ranking,
evaluations by a NumPy forward pass of LeNet-300-100, figures by numpy on hand-written rows,
and a killed-then-resumed run against an uninterrupted one.
"""

import dataclasses
import math
import os

import jax
import numpy as np
import optax
import pytest

from dp_jax.training import optimizers
from dp_jax import masks as masks_lib
from dp_jax import rng
from dp_jax.pruning import records as records_lib
from dp_jax.pruning import rounds as prune_lib
from dp_jax.pruning import setup as setup_lib
from dp_jax.pruning.plan import DENSE, Spec
from dp_jax.rundir import paths
from dp_jax.storage import fileio
from dp_jax.tasks import settings as settings_lib
from dp_jax.training import trainer as train_lib

from conftest import load_config_module

ROUNDS, FRACTION = 3, 0.5
SPEC = Spec(name="imp", label="imp_k0")
KERNELS = ("fc1/kernel", "fc2/kernel", "head/kernel")


@pytest.fixture(scope="module")
def setup(toy_npz):
    c = load_config_module("fashion_mnist").get_config("smoke")
    c.data.name, c.data.train_size = f"npz:{toy_npz}", 0
    c.train.batch_size, c.train.epochs, c.train.eval_batch_size = 40, 2, 64
    c.prune.rounds, c.prune.fraction, c.prune.method = ROUNDS, FRACTION, "imp"
    s = settings_lib.parse(c)
    return setup_lib.build_setup(s, setup_lib.load_data(s))


def _flat(tree):
    return {masks_lib.path_str(p): np.asarray(v) for p, v in
            jax.tree_util.tree_flatten_with_path(tree)[0]}


def _numpy_eval(params, mask, x, y):
    """Accuracy and mean cross-entropy of masked LeNet-300-100, in float64 NumPy."""
    p, m = _flat(params), _flat(mask)
    w = {k: p[k].astype(np.float64) * m[k] for k in p}
    h = np.asarray(x, np.float64).reshape(len(x), -1)
    h = np.maximum(h @ w["fc1/kernel"] + w["fc1/bias"], 0)
    h = np.maximum(h @ w["fc2/kernel"] + w["fc2/bias"], 0)
    z = h @ w["head/kernel"] + w["head/bias"]
    z = z - z.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    y = np.asarray(y)
    return float(np.mean(z.argmax(1) == y)), float(-logp[np.arange(len(y)), y].mean())


def _numpy_magnitude_prune(params, mask, fraction):
    """Global magnitude pruning of the alive kernel weights (no layer empties here: no guard)."""
    p, m = _flat(params), _flat(mask)
    s = np.concatenate([np.abs(p[k]).ravel() for k in KERNELS])
    keep = np.concatenate([m[k].ravel() for k in KERNELS])
    alive = np.flatnonzero(keep)
    keep[alive[np.argsort(s[alive], kind="stable")[:int(round(fraction * alive.size))]]] = False
    ends = np.cumsum([m[k].size for k in KERNELS])
    out = dict(m, **{k: part.reshape(m[k].shape) for k, part in
                     zip(KERNELS, np.split(keep, ends[:-1]))})
    assert all(out[k].any() for k in KERNELS)
    return out


@pytest.fixture(scope="module")
def dense(setup):
    variables = setup.init_fn(rng.key_for(0, rng.INIT))
    ones = masks_lib.ones_like(variables["params"])
    state, ev, _, tm = prune_lib.train_and_eval(setup, variables, ones, rng.key_for(0, rng.DATA))
    record = records_lib.make_record(DENSE, 0, 0, ones, ev, setup.num_steps * 40, 1.5,
                                     train_accuracy=tm["accuracy"])
    return {"variables": variables, "record": record,
            "trained": {"params": state.params, "batch_stats": state.batch_stats}}


def _plan(setup, dense, log, fail_at=None):
    def next_mask(rnd, mask, trained):
        if rnd == fail_at:
            raise RuntimeError("killed")
        log.append((rnd, _flat(trained["params"]), _flat(mask)))
        return prune_lib.prune_step(setup, masks_lib.magnitude_scores(trained["params"]), mask)
    return dict(next_mask=next_mask, start_point=lambda rnd: (dense["variables"], 0),
                search_examples=lambda rnd: 100 + 7 * rnd, uses_trained=lambda rnd: True)


def _run(setup, dense, workdir, log, seen, fail_at=None):
    run = prune_lib.Run(workdir, SPEC, 0)
    try:  # like dp_jax.tasks.prune.run_method, with IMP's plan (k=0) spelled out
        return prune_lib.run_rounds(setup, run, dense, seed_key=rng.seed_key(0),
                                    on_round=seen.append, **_plan(setup, dense, log, fail_at))
    finally:
        run.close()


def _masks(workdir):
    return [dict(np.load(paths.mask_path(workdir, SPEC.label, 0, r))) for r in range(ROUNDS + 1)]


@pytest.fixture(scope="module")
def full(setup, dense, tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("full"))
    log, seen = [], []
    recs = _run(setup, dense, wd, log, seen)
    return wd, recs, log, seen


def test_sparsity_after_and_switch_round_match_the_closed_form():
    """sparsity_after is 1-(1-f)^r; switch_round is ceil(log(1-s)/log(1-f)), float-tolerant."""
    for f in (0.2, 0.36, 0.5):
        for r in range(8):
            assert prune_lib.sparsity_after(r, f) == pytest.approx(1 - (1 - f) ** r, abs=1e-15)
            assert prune_lib.switch_round(prune_lib.sparsity_after(r, f), f) == r
        for s in (0.0, 0.3, 0.5, 0.8, 0.9, 0.95):
            want = 0 if s == 0 else math.ceil(math.log(1 - s) / math.log(1 - f) - 1e-9)
            assert prune_lib.switch_round(s, f) == want, (s, f)
    assert prune_lib.switch_round(0.75, 0.5) == 2 and prune_lib.switch_round(0.76, 0.5) == 3
    # Float round-off: 1-0.8**2 = 0.35999..., yet 36 % sparsity is reached in round 2.
    assert prune_lib.switch_round(0.36, 0.2) == 2 and prune_lib.switch_round(0.488, 0.2) == 3


def _toy_setup(**kw):
    none = dict.fromkeys(("model", "trainer", "tx", "x_train", "y_train", "x_test", "y_test",
                          "init_fn"))
    return prune_lib.Setup(**none, image_shape=(), num_steps=0, rounds=1, **dict(
        dict(fraction=0.5, scope="global", on_empty_layer="ignore"), **kw))


def test_prune_step_applies_the_setups_fraction_scope_rates_and_guard():
    """prune_step applies the setup's fraction, scope, rates, guard, on_empty_layer (hand masks)."""
    a = np.array([[5, 1, 9, 3, 7], [2, 10, 4, 8, 6]], np.float32)
    b = np.array([[0.1, 0.4, 0.2, 0.3]], np.float32)
    scores = {"a": {"kernel": a, "bias": np.zeros(5, np.float32)}, "b": {"kernel": b}}
    ones = {"a": {"kernel": np.ones_like(a, bool), "bias": np.ones(5, bool)},
            "b": {"kernel": np.ones_like(b, bool)}}
    ones["a"]["kernel"][1, 1] = False  # the best-scoring weight is already pruned: stays so
    live = a != 10
    cases = [  # (setup fields, fraction override, a's mask, b's mask), by hand
        ({}, None, live & (a > 2), b > 1),  # global 0.5 of 13: the 6 lowest, b empties (ignored)
        ({"min_per_layer": 1}, None, live & (a > 2), b == 0.4),  # the guard keeps b's best
        ({}, 0.3, live, b > 1),  # round(0.3 * 13) = 4 lowest: all of b
        ({"scope": "layerwise"}, None, live & (a > 4), b > 0.2),  # round(4.5)=4 of a, 2 of b
        ({"layer_rates": {"b": 0.5}}, None, live & (a > 4), b > 0.1),  # b alone: round(1) = 1
    ]
    for fields, fraction, want_a, want_b in cases:
        new = prune_lib.prune_step(_toy_setup(**fields), scores, ones, fraction=fraction)
        np.testing.assert_array_equal(new["a"]["kernel"], want_a, err_msg=str(fields))
        np.testing.assert_array_equal(new["b"]["kernel"], want_b, err_msg=str(fields))
        assert np.asarray(new["a"]["bias"]).all()
    with pytest.raises(ValueError, match="every weight"):
        prune_lib.prune_step(_toy_setup(on_empty_layer="error"), scores, ones)


def test_make_record_and_without_timings_fields_by_hand():
    """make_record's fields are the hand counts; without_timings drops exactly the timings."""
    mask = {"d": {"kernel": np.array([[1, 0, 0], [1, 1, 0]], bool), "bias": np.ones(3, bool)},
            "e": {"kernel": np.array([[0, 0], [0, 1]], bool)}}
    spec = Spec(name="imp", label="imp_k4", options=(("k", "4"),))
    rec = records_lib.make_record(spec, 2, 3, mask, {"accuracy": 0.625, "loss": 1.25},
                                  np.int64(480), 2, mask_s=0.5, compile_s=0.25)
    assert rec == {"method": "imp_k4", "base_method": "imp", "round": 3, "seed": 2,
                   "sparsity": 6 / 10, "remaining_weights": 4, "prunable_weights": 10,
                   "test_accuracy": 0.625, "test_loss": 1.25, "train_examples": 480,
                   "rewind_step": 4, "wall_s": 2.0, "mask_s": 0.5, "compile_s": 0.25}
    assert type(rec["train_examples"]) is int and type(rec["wall_s"]) is float
    row = dict(rec, train_s=1.0, search_s=3.0, train_accuracy=0.5)
    assert records_lib.without_timings(row) == {
        k: v for k, v in row.items()
        if k not in ("wall_s", "mask_s", "train_s", "search_s", "compile_s")}


def test_method_figures_against_numpy_on_hand_rows():
    """method_figures: last round's mean and ddof=1 std over seeds, dense mean, compute sums."""
    acc = {(s, r): 0.5 + 0.1 * s + 0.01 * r + 0.003 * s * s for s in range(3) for r in range(3)}
    rows = [{"method": "random", "seed": 7, "round": 1, "sparsity": 0.5, "test_accuracy": 0.3,
             "train_examples": 0, "wall_s": 2.0}] + [
        {"method": "imp_k0", "seed": s, "round": r, "sparsity": 1 - 0.5 ** r + 0.001 * s,
         "test_accuracy": acc[s, r], "train_examples": 400 * r + s, "wall_s": 1.0 + r + s,
         "search_s": 0.5 * r + s, "compile_s": 0.1} for s in range(3) for r in range(3)]
    figs = records_lib.method_figures(rows)
    assert list(figs) == ["random", "imp_k0"]
    final, imp = [acc[s, 2] for s in range(3)], figs["imp_k0"]
    assert imp["rounds"] == 2 and imp["seeds"] == [0, 1, 2]
    assert imp["final_sparsity"] == pytest.approx(0.75 + 0.001)
    assert imp["final_test_accuracy_mean"] == pytest.approx(np.mean(final))
    assert imp["final_test_accuracy_std"] == pytest.approx(np.std(final, ddof=1))
    assert imp["dense_test_accuracy_mean"] == pytest.approx(np.mean([acc[s, 0] for s in range(3)]))
    assert imp["mask_search_examples"] == 802
    assert imp["search_wall_s"] == pytest.approx(np.mean([1.0 + s for s in range(3)]))
    assert imp["wall_s"] == pytest.approx(sum(1.0 + r + s for s in range(3) for r in range(3)))
    assert imp["compile_s"] == pytest.approx(0.9)
    rnd = figs["random"]
    assert rnd["final_test_accuracy_std"] is None and rnd["dense_test_accuracy_mean"] is None
    assert (rnd["rounds"], rnd["seeds"], rnd["search_wall_s"], rnd["compile_s"]) == (1, [7], 0, 0)


def test_merge_rounds_rewrites_rounds_jsonl_from_the_runs_own_files(tmp_path):
    """merge_rounds rewrites rounds.jsonl as every run's own rows, in sorted run order."""
    wd = str(tmp_path)
    per_run = {("random", 1): [{"method": "random", "seed": 1, "round": 0}],
               ("imp_k0", 0): [{"method": "imp_k0", "seed": 0, "round": r} for r in range(2)],
               ("imp_k0", 10): [{"method": "imp_k0", "seed": 10, "round": 0}]}
    for (label, seed), rows in per_run.items():
        os.makedirs(os.path.join(wd, "runs", f"{label}-seed{seed}"))
        fileio.write_jsonl(os.path.join(wd, "runs", f"{label}-seed{seed}", "rounds.jsonl"), rows)
    os.makedirs(os.path.join(wd, "runs", "dense-seed0"))  # no records of its own
    os.makedirs(os.path.join(wd, "runs", "notes"))  # not a run directory
    fileio.write_jsonl(os.path.join(wd, "rounds.jsonl"), [{"stale": True}] * 5)
    want = per_run[("imp_k0", 0)] + per_run[("imp_k0", 10)] + per_run[("random", 1)]
    assert records_lib.merge_rounds(wd) == want
    assert fileio.read_jsonl(os.path.join(wd, "rounds.jsonl")) == want


def test_train_and_eval_evaluates_like_numpy_and_continues_the_data_order(setup, dense):
    """train_and_eval: pruned stay 0, eval equals NumPy, start_step=k from snapshot k continues."""
    tx = optax.sgd(0.05)  # stateless: a snapshot holds everything the run continues from
    s = dataclasses.replace(setup, tx=tx, trainer=train_lib.Trainer(
        setup.model, tx, batch_size=40, num_train=200, loop=setup.trainer.loop, eval_batch_size=64))
    variables, key = dense["variables"], rng.key_for(0, rng.DATA)
    mask = masks_lib.from_flat(_numpy_magnitude_prune(
        variables["params"], _flat(masks_lib.ones_like(variables["params"])), 0.6))
    logged = []
    s.log_epoch = lambda **kw: logged.append(kw)
    state, ev, snaps, tm = prune_lib.train_and_eval(s, variables, mask, key, snapshot_steps=[4],
                                                    log={"run": "x", "round": 2})
    assert int(state.step) == setup.num_steps and sorted(snaps) == [4]
    for k, v in _flat(state.params).items():
        assert not np.any(v[~_flat(mask)[k]]), k
    acc, loss = _numpy_eval(state.params, mask, setup.x_test, setup.y_test)
    assert ev["accuracy"] == pytest.approx(acc, abs=1e-6)
    assert ev["loss"] == pytest.approx(loss, rel=1e-4)
    assert [(r["epoch"], r["run"], r["round"]) for r in logged] == [(0, "x", 2), (1, "x", 2)]
    assert tm == {k: v for k, v in logged[-1].items() if k not in ("epoch", "run", "round")}
    again, ev2, _, _ = prune_lib.train_and_eval(s, snaps[4], mask, key, start_step=4)
    for k, v in _flat(again.params).items():
        np.testing.assert_allclose(v, _flat(state.params)[k], rtol=1e-6, atol=1e-7, err_msg=k)
    assert ev2 == pytest.approx(ev)
    other, _, _, _ = prune_lib.train_and_eval(s, snaps[4], mask, key, start_step=3)
    assert not np.allclose(_flat(other.params)["fc1/kernel"], _flat(state.params)["fc1/kernel"])


def test_run_rounds_masks_counts_records_and_files(setup, dense, full):
    """run_rounds: NumPy-checked IMP masks and counts, nested, and hand-checked record fields."""
    wd, recs, log, seen = full
    files = _masks(wd)
    n = sum(files[0][k].size for k in KERNELS)
    assert [r for r, _, _ in log] == list(range(1, ROUNDS + 1))
    np.testing.assert_array_equal(log[0][1]["fc1/kernel"],
                                  np.asarray(dense["trained"]["params"]["fc1"]["kernel"]))
    alive = n
    run = prune_lib.Run(wd, SPEC, 0)
    like = {"mask": masks_lib.ones_like(dense["variables"]["params"]), "trained": dense["trained"]}
    for rnd in range(1, ROUNDS + 1):
        _, trained_prev, mask_prev = log[rnd - 1]
        want = _numpy_magnitude_prune(trained_prev, mask_prev, FRACTION)
        for k in want:
            np.testing.assert_array_equal(files[rnd][k], want[k], err_msg=f"{rnd} {k}")
            assert not np.any(files[rnd][k] & ~files[rnd - 1][k])  # nested
        alive -= int(round(FRACTION * alive))
        assert recs[rnd]["remaining_weights"] == alive
        assert abs(alive - round(n * (1 - FRACTION) ** rnd)) <= rnd
        assert recs[rnd]["sparsity"] == pytest.approx(1 - alive / n)
        assert recs[rnd]["train_examples"] == sum(100 + 7 * i for i in range(1, rnd + 1))
        prev = recs[rnd - 1]
        assert recs[rnd]["search_s"] == pytest.approx(
            prev["search_s"] + recs[rnd]["mask_s"] + prev["train_s"])
        assert recs[rnd]["wall_s"] == pytest.approx(recs[rnd]["mask_s"] + recs[rnd]["train_s"])
        arrays, payload = run.ckpt.restore(rnd, like)
        assert payload["records"] == fileio.read_jsonl(run.rounds_path)[:rnd + 1]
        acc, loss = _numpy_eval(arrays["trained"]["params"], arrays["mask"], setup.x_test,
                                setup.y_test)
        assert recs[rnd]["test_accuracy"] == pytest.approx(acc, abs=1e-6)
        assert recs[rnd]["test_loss"] == pytest.approx(loss, rel=1e-4)
    run.close()
    r0 = recs[0]
    assert (r0["method"], r0["base_method"], r0["round"], r0["train_examples"]) == \
        ("imp_k0", "imp", 0, 0)
    assert (r0["search_s"], r0["mask_s"], r0["train_s"]) == (0.0, 0.0, 1.5)
    assert r0["test_accuracy"] == dense["record"]["test_accuracy"]
    assert all(files[0][k].all() for k in files[0])
    assert seen == recs and fileio.read_jsonl(run.rounds_path) == recs


def test_killed_run_resumes_to_the_uninterrupted_records_and_masks(setup, dense, full, tmp_path):
    """A run killed mid-run resumes to the uninterrupted run's records, masks and rounds.jsonl."""
    wd_ref, ref, _, _ = full
    wd = str(tmp_path)
    with pytest.raises(RuntimeError, match="killed"):
        _run(setup, dense, wd, [], [], fail_at=2)
    run = prune_lib.Run(wd, SPEC, 0)
    assert run.ckpt.all_steps() == [0, 1]
    fileio.write_jsonl(run.rounds_path, fileio.read_jsonl(run.rounds_path)[:1])
    run.close()
    log, seen = [], []
    got = _run(setup, dense, wd, log, seen)
    assert [r for r, _, _ in log] == list(range(2, ROUNDS + 1))  # rounds 0-1 are not redone
    assert [r["round"] for r in seen] == list(range(ROUNDS + 1))
    strip = records_lib.without_timings
    assert [strip(r) for r in got] == [strip(r) for r in ref]
    for a, b in zip(_masks(wd), _masks(wd_ref)):
        assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    # Killed after the last checkpoint, before rounds.jsonl: a rerun only rewrites the file.
    fileio.write_jsonl(paths.run_rounds_path(wd, SPEC.label, 0), got[:2])
    log = []
    assert _run(setup, dense, wd, log, []) == got and log == []
    assert fileio.read_jsonl(paths.run_rounds_path(wd, SPEC.label, 0)) == got


def _commit_rounds(wd, keep="all", n=3):
    """Rounds 0..n-1 committed with hand-made masks and weights (no training)."""
    run = prune_lib.Run(wd, SPEC, 0, keep=keep)
    masks, recs = [], []
    for r in range(n):
        m = {"l": {"kernel": np.arange(6).reshape(2, 3) >= r, "bias": np.ones(3, bool)}}
        t = {"params": {"l": {"kernel": np.full((2, 3), r + 0.5, np.float32),
                              "bias": np.zeros(3, np.float32)}}, "batch_stats": {}}
        recs.append({"round": r, "wall_s": 1.0})
        run.commit(r, m, {"mask": m, "trained": t}, list(recs))
        masks.append(m)
    return run, masks, recs, {"mask": masks[0], "trained": t}


def test_run_resume_falls_back_and_repairs(tmp_path):
    """Run.resume: last good round, lost mask rewritten, damaged checkpoint dropped, keep='last'."""
    fresh = prune_lib.Run(str(tmp_path / "new"), SPEC, 0)
    assert fresh.resume({}) == (0, None, [])
    fresh.close()
    wd = str(tmp_path / "a")
    run, masks, recs, like = _commit_rounds(wd)
    nxt, arrays, got = run.resume(like)
    assert (nxt, got) == (3, recs)
    np.testing.assert_array_equal(arrays["trained"]["params"]["l"]["kernel"], np.full((2, 3), 2.5))
    os.remove(run.mask_path(1))
    with pytest.warns(RuntimeWarning, match="missing"):
        assert run.resume(like)[0] == 3
    np.testing.assert_array_equal(np.load(run.mask_path(1))["l/kernel"], masks[1]["l"]["kernel"])
    ck = os.path.join(run.dir, "checkpoints", "2")
    victim = max((os.path.join(d, f) for d, _, fs in os.walk(ck) for f in fs), key=os.path.getsize)
    with open(victim, "ab") as f:
        f.write(b"garbage")
    with pytest.warns(RuntimeWarning, match="damaged"):
        nxt, arrays, got = run.resume(like)
    assert (nxt, got, run.ckpt.all_steps()) == (2, recs[:2], [0, 1])
    np.testing.assert_array_equal(arrays["mask"]["l"]["kernel"], masks[1]["l"]["kernel"])
    run.close()
    run, _, _, like = _commit_rounds(str(tmp_path / "b"), keep="last")
    assert run.ckpt.all_steps() == [1, 2]
    os.remove(run.mask_path(0))
    with pytest.raises(ValueError, match="no longer kept"):
        run.resume(like)
    run.close()


def test_rewinding_continues_the_learning_rate_schedule(setup, dense):
    """Rewound to step k, a run goes on with the schedule of step k: with momentum-free SGD and
    a multistep schedule, training from snapshot k equals the uninterrupted run."""
    from dp_jax.training.settings import TrainSettings
    cfg = TrainSettings.from_config(lr=0.2, momentum=0.0, weight_decay=0.0,
                                    schedule="multistep", decay_at=(0.3, 0.6), decay_factor=0.1)
    tx = optimizers.make_optimizer(cfg, setup.num_steps)
    s = dataclasses.replace(setup, tx=tx, trainer=train_lib.Trainer(
        setup.model, tx, batch_size=40, num_train=200, loop=setup.trainer.loop, eval_batch_size=64))
    variables, key = dense["variables"], rng.key_for(0, rng.DATA)
    mask = masks_lib.ones_like(variables["params"])
    k = setup.num_steps // 2  # after the first decay (30 %), before the second (60 %)
    full, _, snaps, _ = prune_lib.train_and_eval(s, variables, mask, key, snapshot_steps=[k])
    again, _, _, _ = prune_lib.train_and_eval(s, snaps[k], mask, key, start_step=k)
    for name, v in _flat(again.params).items():
        np.testing.assert_allclose(v, _flat(full.params)[name], rtol=1e-5, atol=1e-6,
                                   err_msg=name)
