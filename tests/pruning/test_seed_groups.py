"""Seeds as one program (``parallel.vmap_seeds``): the same runs as seeds one after another.

Every test runs the real experiment entry twice on generated data, once with the seeds
vmapped and once sequentially, and compares the run directories' records, masks and trained
weights.
"""

import os
import shutil

import jax
import numpy as np
import pytest

from dp_jax.tasks import prune as experiment
from dp_jax.storage import fileio
from dp_jax.pruning import seeds as seed_groups
from dp_jax.pruning.records import TIMINGS

from conftest import assert_rejected, make_distilled

@pytest.mark.parametrize("loop", ["scan", "python"])
def test_train_seeds_follows_each_seeds_own_trajectory_and_compiles_once(loop):
    import optax
    from dp_jax import masks
    from dp_jax.training import trainer as train
    from dp_jax.models import create_model, init_variables
    import ml_collections
    model = create_model(ml_collections.ConfigDict(dict(name="lenet_300_100")), num_classes=3)
    x = jax.random.normal(jax.random.key(0), (64, 4, 4, 1))
    y = jax.numpy.arange(64) % 3
    tx = optax.sgd(0.05, momentum=0.9)
    tr = train.Trainer(model, tx, batch_size=16, num_train=64, loop=loop)
    vs = [init_variables(model, jax.random.key(s), (4, 4, 1)) for s in range(3)]
    keys = [jax.random.key(10 + s) for s in range(3)]
    for r in range(2):  # new masks each "round": the vmapped programs are not retraced
        ms = [masks.prune(masks.random_scores(v["params"], jax.random.key(r + 5 * i)),
                          masks.ones_like(v["params"]), 0.4) for i, v in enumerate(vs)]
        logged = []
        got, snaps = tr.train_seeds(
            train.stack([train.create_state(v, m, tx) for v, m in zip(vs, ms)]), x, y,
            jax.numpy.stack(keys), 10, snapshot_steps=[3],
            on_epoch=lambda e, m: logged.append((e, m)))
        for i in range(3):
            alone, snap = tr.train(train.create_state(vs[i], ms[i], tx), x, y, keys[i], 10,
                                   snapshot_steps=[3])
            for a, b in zip(jax.tree.leaves(train.unstack(got)[i].params),
                            jax.tree.leaves(alone.params)):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
            for a, b in zip(jax.tree.leaves(train.unstack(snaps[3])[i]), jax.tree.leaves(snap[3])):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
            p = train.unstack(got)[i].params  # pruned weights stay exactly zero
            for a, b in zip(jax.tree.leaves(masks.apply(p, ms[i])), jax.tree.leaves(p)):
                np.testing.assert_array_equal(a, b)
        assert [e for e, _ in logged] == [0, 1, 2] and len(logged[0][1]) == 3
        sizes = [f._cache_size() for f in tr._programs[True]]
        if r == 0:
            first = sizes  # one program per segment length (scan) or one step (python)
    assert sizes == first
    assert sizes[2 if loop == "python" else 1] == (1 if loop == "python" else 4)


def _records(wd):
    rows = fileio.read_jsonl(os.path.join(wd, "rounds.jsonl"))
    return {(r["method"], r["seed"], r["round"]): r for r in rows}


def _masks(wd, run, rnd):
    with np.load(os.path.join(wd, "runs", run, "masks", f"round_{rnd:03d}.npz")) as f:
        return {k: f[k] for k in f.files}


def _compare(wd_on, wd_off, runs, rounds, *, atol):
    on, off = _records(wd_on), _records(wd_off)
    assert sorted(on) == sorted(off)
    for key in on:
        a, b = on[key], off[key]
        assert set(a) == set(b), key
        for field in ("sparsity", "remaining_weights", "train_examples", "rewind_step"):
            assert a[field] == b[field], (key, field)
        assert abs(a["test_loss"] - b["test_loss"]) <= atol, key
        assert abs(a["test_accuracy"] - b["test_accuracy"]) <= 0.02, key
    for run in runs:
        for rnd in range(rounds + 1):
            ma, mb = _masks(wd_on, run, rnd), _masks(wd_off, run, rnd)
            assert sorted(ma) == sorted(mb)
            assert all(np.array_equal(ma[k], mb[k]) for k in ma), (run, rnd)


def _run_both(config, tmp_path):
    config.seeds = 2
    config.parallel.vmap_seeds = "on"
    on = experiment.run(config, str(tmp_path / "on"))
    config.parallel.vmap_seeds = "off"
    off = experiment.run(config, str(tmp_path / "off"))
    assert on["vmap_seeds"] and not off["vmap_seeds"]
    return str(tmp_path / "on"), str(tmp_path / "off")


@pytest.mark.slow  # the default run covers this path with a smaller test
def test_vmapped_seeds_equal_sequential_mlp(tiny_config, tmp_path):
    tiny_config.prune.method = "imp,imp:k=3,random,reinit:of=imp_k0,snip,dp"
    tiny_config.distill.path = make_distilled(tiny_config, str(tmp_path / "syn.npz"))
    tiny_config.dp.steps = 10
    on, off = _run_both(tiny_config, tmp_path)
    runs = [f"{m}-seed{s}" for m in ("imp_k0", "imp_k3", "random", "reinit_imp_k0", "snip", "dp")
            for s in (0, 1)]
    _compare(on, off, runs, tiny_config.prune.rounds, atol=1e-4)
    # The seeds differ: each slot of the program trained its own seed.
    r = _records(on)
    assert r[("imp_k0", 0, 2)]["test_loss"] != r[("imp_k0", 1, 2)]["test_loss"]


def test_vmapped_seeds_equal_sequential_batchnorm_convnet(tiny_config, tmp_path):
    tiny_config.model.name = "convnet"
    tiny_config.model.width = 4
    tiny_config.model.depth = 2
    tiny_config.model.norm = "batch"
    tiny_config.prune.method = "imp,imp:k=3"
    on, off = _run_both(tiny_config, tmp_path)
    _compare(on, off, [f"{m}-seed{s}" for m in ("imp_k0", "imp_k3") for s in (0, 1)],
             tiny_config.prune.rounds, atol=1e-4)


def test_seed_behind_after_a_kill_catches_up_exactly(tiny_config, tmp_path):
    """Seed 1 lost its last round (as after a kill): it reruns in a padded group, and every
    record and mask equals the uninterrupted run's."""
    tiny_config.seeds = 2
    tiny_config.parallel.vmap_seeds = "on"
    tiny_config.prune.method = "imp"
    wd = str(tmp_path / "wd")
    experiment.run(tiny_config, wd)
    ref = _records(wd)
    last = tiny_config.prune.rounds
    ref_mask = _masks(wd, "imp_k0-seed1", last)
    run_dir = os.path.join(wd, "runs", "imp_k0-seed1")
    shutil.rmtree(os.path.join(run_dir, "checkpoints", str(last)))
    os.remove(os.path.join(run_dir, "masks", f"round_{last:03d}.npz"))
    os.remove(os.path.join(wd, "summary.json"))
    experiment.run(tiny_config, wd)
    got = _records(wd)
    strip = lambda r: {k: v for k, v in r.items() if k not in TIMINGS}  # noqa: E731
    assert {k: strip(v) for k, v in got.items()} == {k: strip(v) for k, v in ref.items()}
    assert all(np.array_equal(ref_mask[k], v) for k, v in
               _masks(wd, "imp_k0-seed1", last).items())


def test_auto_rule_and_rejections(tiny_config, tmp_path):
    cpu = jax.default_backend() == "cpu"
    kw = dict(stream=False, data_parallel=False)
    assert seed_groups.enabled("auto", 2, **kw) is (not cpu)  # as the suite measured
    assert not seed_groups.enabled("auto", 1, **kw)
    assert not seed_groups.enabled("auto", 2, stream=False, data_parallel=True)
    assert seed_groups.enabled("on", 2, **kw) and not seed_groups.enabled("off", 2, **kw)
    with pytest.raises(ValueError, match="does not combine"):
        seed_groups.enabled("on", 2, stream=True, data_parallel=False)
    assert_rejected(tiny_config, "parallel.vmap_seeds", "yes", "parallel.vmap_seeds",
                    tmp_path / "a")
    tiny_config.parallel.data_parallel = True
    assert_rejected(tiny_config, "parallel.vmap_seeds", "on", "parallel.vmap_seeds",
                    tmp_path / "b")
