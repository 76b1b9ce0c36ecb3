"""Learning-rate rewinding: round r trains from round r-1's trained weights (masked) at step 0,
with IMP's magnitude mask; checked against NumPy and across a resume. Also the end-to-end run
of every new method (lrr, random:dist=erk, force) through the command line."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from dp_jax import masks, methods
from dp_jax.pruning import plan as plan_lib
from dp_jax.pruning import rounds as prune
from dp_jax.storage import fileio
from dp_jax.tasks import prune as experiment
from dp_jax.training import trainer as train_lib

from conftest import ROOT


def _flat(tree) -> dict:
    return {masks.path_str(p): np.array(v)
            for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture
def spy(monkeypatch):
    """Every training of the experiment, as NumPy copies: ``{round: {"state0": the state it
    starts from (params, batch_stats, step), "mask", "trained"}}`` (round 0: the dense run)."""
    calls, now = {}, {}
    real_train, real_create = prune.train_and_eval, train_lib.create_state

    def create_state(*args, **kw):
        state = real_create(*args, **kw)
        now["state0"] = {"params": _flat(state.params), "batch_stats": _flat(state.batch_stats),
                         "step": int(state.step)}
        return state

    def train_and_eval(setup, variables, mask, key, **kw):
        state, ev, snaps, tm = real_train(setup, variables, mask, key, **kw)
        calls[kw["log"]["round"]] = {"state0": now.pop("state0"), "mask": _flat(mask),
                                     "trained": {"params": _flat(state.params),
                                                 "batch_stats": _flat(state.batch_stats)}}
        return state, ev, snaps, tm
    monkeypatch.setattr(train_lib, "create_state", create_state)
    monkeypatch.setattr(prune, "train_and_eval", train_and_eval)
    return calls


def _numpy_magnitude_prune(params: dict, alive: dict, fraction: float) -> dict:
    """Global magnitude pruning with masks.prune's documented rules, written independently:
    round(fraction * alive) lowest |w| go (ties by position in the concatenation), then every
    layer keeps at least its one largest |w| (min_per_layer=1)."""
    keys = sorted(alive)
    s = np.concatenate([np.abs(params[k]).astype(np.float64).ravel() for k in keys])
    a = np.concatenate([alive[k].ravel() for k in keys])
    idx = np.flatnonzero(a)
    n = int(round(fraction * idx.size))
    keep = a.copy()
    keep[sorted(idx, key=lambda i: (s[i], i))[:n]] = False
    out, off = {}, 0
    for k in keys:
        m = keep[off:off + alive[k].size].reshape(alive[k].shape)
        if not m.any():
            m.ravel()[np.argmax(np.where(alive[k], np.abs(params[k]), -1).ravel())] = True
        out[k] = m
        off += alive[k].size
    return out


def _kernels(flat: dict) -> dict:
    return {k: v for k, v in flat.items() if k.endswith("kernel")}


def test_lrr_trains_round_r_from_round_r_minus_1s_trained_weights(tiny_config, tmp_path, spy):
    c = tiny_config
    c.prune.method, c.prune.rounds = "lrr", 2
    wd = str(tmp_path / "wd")
    experiment.run(c, wd)
    for rnd in (1, 2):
        prev, cur = spy[rnd - 1], spy[rnd]
        trained = prev["trained"]["params"]
        # The mask: magnitude pruning of the previous round's trained weights (NumPy).
        want = _numpy_magnitude_prune(_kernels(trained), _kernels(prev["mask"]), c.prune.fraction)
        for k, v in want.items():
            np.testing.assert_array_equal(cur["mask"][k], v, err_msg=(rnd, k))
        # The start: those trained weights times the new mask, at step 0 (the whole schedule).
        state0 = cur["state0"]
        assert state0["step"] == 0
        assert state0["params"].keys() == trained.keys()
        for k, w in trained.items():
            np.testing.assert_array_equal(state0["params"][k], np.where(cur["mask"][k], w, 0),
                                          err_msg=(rnd, k))
        for k, v in prev["trained"]["batch_stats"].items():
            np.testing.assert_array_equal(state0["batch_stats"][k], v)
    # Round 1's start is the dense run's trained network, not its init.
    assert any(not np.array_equal(spy[1]["state0"]["params"][k], spy[0]["state0"]["params"][k])
               for k in _kernels(spy[0]["state0"]["params"]))
    rows = sorted(fileio.read_jsonl(os.path.join(wd, "rounds.jsonl")), key=lambda r: r["round"])
    examples = c.train.epochs * (200 // c.train.batch_size) * c.train.batch_size
    assert [r["train_examples"] for r in rows] == [0, examples, 2 * examples]
    assert [r["remaining_weights"] for r in rows] == [50200, 25100, 12550]
    assert methods.get("lrr").start(methods.parse("lrr", c)[0]) == plan_lib.TRAINED


def _records(wd):
    from dp_jax.pruning.records import without_timings
    return [without_timings(r) for r in sorted(fileio.read_jsonl(os.path.join(wd, "rounds.jsonl")),
                                               key=lambda r: r["round"])]


def _mask_file(wd, rnd):
    with np.load(os.path.join(wd, "runs", "lrr-seed0", "masks", f"round_{rnd:03d}.npz")) as z:
        return {k: z[k] for k in z.files}


def test_resumed_lrr_continues_from_the_checkpointed_trained_weights(tiny_config, tmp_path,
                                                                      spy):
    c = tiny_config
    c.prune.method, c.prune.rounds = "lrr", 2
    whole = str(tmp_path / "whole")
    experiment.run(c, whole)
    round1_trained = spy[1]["trained"]["params"]
    spy.clear()
    # The same run in two calls: one round, then the second from round 1's checkpoint.
    split = str(tmp_path / "split")
    c.prune.rounds = 1
    experiment.run(c, split)
    spy.clear()
    c.prune.rounds = 2
    experiment.run(c, split)
    assert sorted(spy) == [2]  # the second call trained round 2 only (the rest restored)
    for k, w in round1_trained.items():
        np.testing.assert_array_equal(spy[2]["state0"]["params"][k],
                                      np.where(spy[2]["mask"][k], w, 0), err_msg=k)
    assert _records(split) == _records(whole)
    for k, v in _mask_file(whole, 2).items():
        np.testing.assert_array_equal(_mask_file(split, 2)[k], v, err_msg=k)


def test_export_and_analysis_start_an_lrr_round_from_the_previous_rounds_weights(
        tiny_config, tmp_path, spy):
    from dp_jax.analysis import context
    from dp_jax.analysis.settings import Settings
    from dp_jax.tasks import export, settings as settings_lib
    c = tiny_config
    c.prune.method, c.prune.rounds = "lrr", 2
    wd = str(tmp_path / "wd")
    experiment.run(c, wd)
    settings, _ = settings_lib.from_workdir(wd)
    spec = settings.specs[0]
    setup = export.rebuild_setup(settings)
    ctx = context.Context(wd, settings, Settings(), (), lambda m: None)
    seed_state = context.SeedState(ctx, 0, [0])
    for rnd in (1, 2):  # round 1 from the dense run's training, round 2 from round 1's
        want = spy[rnd - 1]["trained"]["params"]
        variables, step, desc = export.start_point(setup, wd, spec, 0, rnd)
        assert step == 0 and desc["kind"] == "trained" and desc["round"] == rnd - 1
        got_analysis, k, tag = seed_state.start_point(ctx, spec, rnd)
        assert k == 0 and tag.kind == "trained" and tag.step == rnd - 1
        for got in (_flat(variables["params"]), _flat(got_analysis["params"])):
            for key, w in want.items():
                np.testing.assert_array_equal(got[key], w, err_msg=(rnd, key))


def test_from_trained_needs_the_rounds_trained_variables_first():
    next_mask, start_point = plan_lib.from_trained(lambda rnd, mask, trained: mask)
    with pytest.raises(RuntimeError, match="before next_mask"):
        start_point(1)
    assert next_mask(3, "m", {"params": "w"}) == "m"
    assert start_point(3) == ({"params": "w"}, 0)
    with pytest.raises(RuntimeError, match="before next_mask"):
        start_point(4)


@pytest.mark.slow  # the default run covers this path with a smaller test
def test_new_methods_run_from_the_command_line(toy_npz, tmp_path):
    """imp, lrr, random:dist=erk and force:iters=3 on the smoke config (LeNet-300-100 on the 8x8
    toy set: fc1 64x300, fc2 300x100, head 100x10 = 50200 weights; 2 rounds of 50 %)."""
    wd = tmp_path / "wd"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "dp_jax.main", "--config=configs/fashion_mnist.py:smoke",
           f"--workdir={wd}", f"--config.data.name=npz:{toy_npz}", "--config.data.train_size=0",
           "--config.train.batch_size=40", "--config.prune.method=imp,lrr,random:dist=erk,"
           "force:iters=3"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = fileio.read_jsonl(str(wd / "rounds.jsonl"))
    by = {}
    for r in sorted(rows, key=lambda r: r["round"]):
        by.setdefault(r["method"], []).append(r)
    assert sorted(by) == ["force", "imp_k0", "lrr", "random_erk"]
    for label, rs in by.items():
        assert [r["remaining_weights"] for r in rs] == [50200, 25100, 12550], label
        assert [r["sparsity"] for r in rs] == pytest.approx([0, 0.5, 0.75]), label
    full = 2 * (200 // 40) * 40  # one training: 2 epochs of 5 batches of 40
    assert [r["train_examples"] for r in by["lrr"]] == [0, full, 2 * full]
    assert [r["train_examples"] for r in by["imp_k0"]] == [0, full, 2 * full]
    assert [r["train_examples"] for r in by["force"]] == [0, 3 * 40, 6 * 40]
    assert [r["train_examples"] for r in by["random_erk"]] == [0, 0, 0]

    def mask(label, rnd):
        with np.load(wd / "runs" / f"{label}-seed0" / "masks" / f"round_{rnd:03d}.npz") as z:
            return {k: z[k] for k in z.files if k.endswith("kernel")}

    def layer_counts(label, rnd):
        return {k: int(v.sum()) for k, v in mask(label, rnd).items()}
    for label in by:  # nested
        for k, v in mask(label, 2).items():
            assert not np.any(v & ~mask(label, 1)[k]), (label, k)
    # ERK ratios (in + out)/(in out) x n: fc1 364, fc2 400, head 110 (sum 874).
    # Round 1 keeps 25100: head would get 0.11 x 25100/874 = 3.2 > 1, so it is dense (1000), and
    # eps = 24100/764: fc1 364 eps = 11482.20, fc2 400 eps = 12617.80 -> 11482, 12618.
    assert layer_counts("random_erk", 1) == {"fc1/kernel": 11482, "fc2/kernel": 12618,
                                             "head/kernel": 1000}
    # Round 2 keeps 12550: head dense again (0.11 x 12550/874 = 1.58), eps = 11550/764:
    # fc1 5502.88, fc2 6047.12 -> 5503, 6047.
    assert layer_counts("random_erk", 2) == {"fc1/kernel": 5503, "fc2/kernel": 6047,
                                             "head/kernel": 1000}
    # LRR's first mask is IMP's (both prune the dense run's trained weights); then they part.
    for k, v in mask("imp_k0", 1).items():
        np.testing.assert_array_equal(mask("lrr", 1)[k], v, err_msg=k)
    assert any(np.any(v != mask("lrr", 2)[k]) for k, v in mask("imp_k0", 2).items())
    report = (wd / "report.md").read_text()
    for name in ("LRR (learning-rate rewinding)", "FORCE", "Random pruning (ERK)"):
        assert name in report
