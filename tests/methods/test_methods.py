"""The method registry and the pruning-at-init baselines, end to end and against references.

This module also defines a method of its own (``inverse_magnitude``) and registers it: the
CLI test imports it through ``prune.plugins``, as a researcher's plugin would be.
"""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from dp_jax.tasks import prune as experiment
from dp_jax.pruning import setup as setup_lib
from dp_jax.storage import fileio
from dp_jax import masks, methods
from dp_jax.pruning import rounds as prune
from dp_jax.methods import base

from conftest import ROOT, assert_rejected, load_config_module, make_distilled

HERE = os.path.dirname(os.path.abspath(__file__))


class InverseMagnitude(base.Method):
    """Keeps the *smallest* weights of the init: a deliberately bad method, for the tests."""
    name = "inverse_magnitude"
    title = "Inverse magnitude"

    def plan(self, spec, ctx):
        scores = jax.tree.map(lambda w: -abs(w), ctx.dense["variables"]["params"])
        return base.Plan(
            next_mask=lambda rnd, mask, trained: prune.prune_step(ctx.setup, scores, mask),
            start_point=base.rewind_start(ctx.dense, 0), search_examples=lambda rnd: 0)


methods.register(InverseMagnitude())


def _rows(wd, label):
    return sorted((r for r in fileio.read_jsonl(os.path.join(wd, "rounds.jsonl"))
                   if r["method"] == label), key=lambda r: r["round"])


def _mask(wd, label, rnd):
    with np.load(os.path.join(wd, "runs", f"{label}-seed0", "masks", f"round_{rnd:03d}.npz")) as z:
        return {k: z[k] for k in z.files}


def _kernels(m):
    return {k: v for k, v in m.items() if k.endswith("kernel")}


def test_plugin_method_runs_through_the_cli(toy_npz, tmp_path):
    wd = tmp_path / "wd"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([HERE, os.path.join(ROOT, "tests"), ROOT]))
    cmd = [sys.executable, "-m", "dp_jax.main", "--config=configs/fashion_mnist.py:smoke",
           f"--workdir={wd}", f"--config.data.name=npz:{toy_npz}", "--config.data.train_size=0",
           "--config.train.batch_size=40", "--config.prune.plugins=test_methods",
           "--config.prune.method=inverse_magnitude,mag_init"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    init = fileio.read_jsonl(str(wd / "rounds.jsonl"))
    assert {r["method"] for r in init} == {"inverse_magnitude", "mag_init"}
    # Round 1 at 50 %: inverse keeps the smallest |w| of the init, mag_init the largest,
    # so the two masks share no weight.
    a, b = _kernels(_mask(str(wd), "inverse_magnitude", 1)), _kernels(_mask(str(wd), "mag_init", 1))
    overlap = sum(int(np.sum(a[k] & b[k])) for k in a)
    assert overlap == 0
    assert "Inverse magnitude" in (wd / "report.md").read_text()


@pytest.mark.parametrize("entry,match", [
    ("imp,magic", "unknown method 'magic'"),
    ("snip:iters=3", "option 'iters=3' is not valid for 'snip'"),
    ("synflow:iters=0", "iters .* must be >= 1"),
    ("synflow:iters=x", "must be an integer"),
    ("subset:n=-5", "n .* must be >= 1"),
    ("imp:k=-1", "must be >= 0"),
    ("mag_init:k=3", "not valid for 'mag_init'"),
    ("snip:oneshot=1", "not valid for 'snip'"),
    ("reinit:of=snip", "needs the run 'snip' listed before it"),
    ("snip,snip", "lists a run twice"),
])
def test_bad_method_entries_fail_before_any_work(tiny_config, tmp_path, entry, match):
    tiny_config.prune.method = entry
    wd = tmp_path / "wd"
    with pytest.raises(ValueError, match=match):
        experiment.run(tiny_config, str(wd))
    assert not wd.exists()


@pytest.mark.parametrize("field,value,match", [
    ("prune.layer_rates", "Dense_9=0.5", "unknown layer 'Dense_9'; valid layers: fc1, fc2, head"),
    ("prune.layer_rates", "head=1.5", "prune.layer_rates"),
    ("prune.layer_rates", "head=0", "prune.layer_rates"),
    ("prune.layer_rates", "head", "prune.layer_rates"),
    ("prune.min_per_layer", -1, "prune.min_per_layer"),
    ("prune.score_batches", 0, "prune.score_batches"),
    ("prune.method", "subset:n=9", r"subset:n=9 is invalid; allowed: at least one image for "
                                   r"each of the 10 classes"),
    ("prune.method", "subset:n=100000", "at most the 200 training images"),
    ("prune.plugins", "no_such_module_xyz", "prune.plugins: cannot import"),
])
def test_bad_method_settings_fail_before_any_work(tiny_config, tmp_path, field, value, match):
    tiny_config.prune.method = "snip,imp"
    tiny_config.dp.subset_lr = 0.05  # subset's own step size (without one it is refused first)
    assert_rejected(tiny_config, field, value, match, tmp_path / "wd")


def test_pruning_at_init_methods_end_to_end(tiny_config, tmp_path):
    c = tiny_config
    c.prune.method = "snip,snip:oneshot,grasp,synflow:iters=5,mag_init,subset:n=20,random"
    c.prune.rounds = 3
    c.dp.steps = 10
    c.dp.batch_size = 10
    c.dp.subset_lr = 0.05
    wd = str(tmp_path / "wd")
    experiment.run(c, wd)
    labels = ["snip", "snip_oneshot", "grasp", "synflow", "mag_init", "subset_n20", "random"]
    for label in labels:
        rows = _rows(wd, label)
        # Every method reaches IMP's schedule: 50 % of the remainder per round.
        np.testing.assert_allclose([r["sparsity"] for r in rows], [0, 0.5, 0.75, 0.875], atol=2e-3)
        for rnd in range(1, 4):  # nested masks
            prev, cur = _mask(wd, label, rnd - 1), _mask(wd, label, rnd)
            assert all(not np.any(cur[k] & ~prev[k]) for k in cur), (label, rnd)
    B = c.train.batch_size
    assert [r["train_examples"] for r in _rows(wd, "snip")] == [0, B, 2 * B, 3 * B]
    assert [r["train_examples"] for r in _rows(wd, "snip_oneshot")] == [0, B, B, B]
    assert all(r["train_examples"] == 0 for label in ("synflow", "mag_init")
               for r in _rows(wd, label))
    # subset: the DP inner loop's budget, 10 steps x batch 10 per round.
    assert [r["train_examples"] for r in _rows(wd, "subset_n20")] == [0, 100, 200, 300]
    # Magnitude at init equals a NumPy ranking of |init| (one global threshold).
    setup_init = _init_params(c)
    flat = {k: np.abs(np.asarray(v)) for k, v in masks.prunable_leaves(setup_init).items()}
    allw = np.concatenate([v.reshape(-1) for v in flat.values()])
    keep = round(0.125 * allw.size)
    thresh = np.sort(allw)[::-1][keep - 1]
    got = _kernels(_mask(wd, "mag_init", 3))
    for k, v in flat.items():
        want = v >= thresh
        if not want.any():  # the collapse guard (min_per_layer=1) keeps the layer's largest |w|
            want.reshape(-1)[np.argmax(v)] = True
        np.testing.assert_array_equal(got[k], want, err_msg=k)
    # Here the guard was needed: fc2's small init loses every weight to one global threshold.
    assert not np.any(flat["fc2/kernel"] >= thresh) and got["fc2/kernel"].sum() == 1
    report = open(os.path.join(wd, "report.md")).read()
    for name in ("SNIP (one-shot)", "GraSP", "SynFlow", "Magnitude at init",
                 "Random real subset (n=20)"):
        assert name in report


def _init_params(c):
    """The seed's init exactly as the experiment makes it (the same compiled program)."""
    from dp_jax import rng
    from dp_jax.data import load_dataset
    setup = setup_lib.build_setup(c, load_dataset(c.data, seed=c.seed))
    return setup.init_fn(rng.key_for(c.seed, rng.INIT))["params"]


def test_subset_uses_n_stratified_images_and_the_dp_inner_loop(tiny_config, tmp_path,
                                                                 monkeypatch):
    c = tiny_config
    c.prune.method = "subset:n=30"
    c.prune.rounds = 2
    c.dp.steps = 7
    c.dp.batch_size = 10
    c.dp.subset_lr = 0.05
    calls, built = [], []
    from dp_jax.training import small_set
    real = small_set.make_inner_train

    def spy(model, recipe, n, augment, **kw):
        built.append((recipe.num_steps(n), recipe.batch_size, n, recipe.lr))
        inner = real(model, recipe, n, augment, **kw)

        def fn(variables, mask, x, y, keys):
            calls.append((np.asarray(x).copy(), np.asarray(y).copy(), keys.shape[0]))
            return inner(variables, mask, x, y, keys)
        return fn
    monkeypatch.setattr(small_set, "make_inner_train", spy)
    monkeypatch.setattr(small_set, "_PROGRAMS", {})
    experiment.run(c, str(tmp_path / "wd"))
    assert built == [(7, 10, 30, 0.05)]
    assert len(calls) == 2  # one inner run per round
    x0, y0, seeds = calls[0]
    assert x0.shape[0] == 30 and seeds == c.dp.inner_seeds
    np.testing.assert_array_equal(np.bincount(y0, minlength=10), np.full(10, 3))
    # The same subset every round, and its images are real training images.
    np.testing.assert_array_equal(calls[1][0], x0)
    from dp_jax.data import load_dataset
    ds = load_dataset(c.data, seed=c.seed)
    flat = ds.x_train.reshape(len(ds.x_train), -1)
    for img in x0.reshape(30, -1):
        assert np.any(np.all(flat == img, axis=1))


def test_subset_without_any_step_size_is_refused(tiny_config, tmp_path):
    tiny_config.prune.method = "subset:n=20"
    with pytest.raises(ValueError, match="dp.subset_lr"):
        experiment.run(tiny_config, str(tmp_path / "wd"))


def test_default_subset_size_is_the_distilled_set(tiny_config, tmp_path):
    c = tiny_config
    c.distill.path = make_distilled(c, str(tmp_path / "syn.npz"), per_class=3)
    c.prune.method = "dp,subset"
    c.prune.rounds = 1
    c.dp.steps = 5
    c.dp.batch_size = 100
    wd = str(tmp_path / "wd")
    experiment.run(c, wd)
    # 30 distilled images -> a 30-image subset; both search with 5 steps x 30 images.
    assert _rows(wd, "subset")[1]["train_examples"] == _rows(wd, "dp")[1]["train_examples"] == 150


def test_layer_rates_and_collapse_guard_in_prune():
    rng = np.random.default_rng(0)
    params = {"a": {"kernel": rng.normal(size=(20, 10))},
              "b": {"kernel": rng.normal(size=(10, 4)) * 1e-3}}
    ones = masks.ones_like(params)
    # Without the guard, 90 % global magnitude pruning removes every weight of the tiny layer.
    with pytest.warns(RuntimeWarning, match="removed every weight"):
        m = masks.prune(masks.magnitude_scores(params), ones, 0.9)
    assert not np.any(m["b"]["kernel"])
    g = masks.prune(masks.magnitude_scores(params), ones, 0.9, min_per_layer=3)
    kept = np.asarray(g["b"]["kernel"])
    assert kept.sum() == 3
    # The guard keeps the layer's three largest |w|.
    top = np.argsort(-np.abs(params["b"]["kernel"]).reshape(-1))[:3]
    assert set(np.flatnonzero(kept.reshape(-1))) == set(top)
    # Layer rates: 'b' prunes half the global rate of its own weights, 'a' the global rate.
    r = masks.prune(masks.magnitude_scores(params), ones, 0.5, layer_rates={"b": 0.5})
    assert int(np.sum(r["b"]["kernel"])) == 40 - round(0.25 * 40)
    assert int(np.sum(r["a"]["kernel"])) == 200 - 100
    with pytest.raises(ValueError, match="valid layers: a, b"):
        masks.prune(masks.magnitude_scores(params), ones, 0.5, layer_rates={"c": 0.5})


def test_registry_names_and_labels():
    cfg = load_config_module("fashion_mnist").get_config()
    specs = methods.parse("imp,imp:k=200,snip:oneshot,synflow,subset:n=100,reinit:of=imp_k0", cfg)
    assert [s.label for s in specs] == ["imp_k0", "imp_k200", "snip_oneshot", "synflow",
                                        "subset_n100", "reinit_imp_k0"]
    assert specs[3].opt("iters") == 100
    assert [methods.pretty(s.label) for s in specs] == [
        "IMP (k=0)", "IMP (k=200)", "SNIP (one-shot)", "SynFlow", "Random real subset (n=100)",
        "Re-init of IMP (k=0)"]
