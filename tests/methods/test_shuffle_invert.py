"""The mask controls of Frankle et al. (ICLR 2021): ``shuffle:of=LABEL`` (masks permuted within
each layer) and ``invert:of=LABEL`` (the highest scores pruned), end to end from the command line
and against independent computations."""

import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from dp_jax import masks, methods, rng
from dp_jax.methods import saliency, scored, shuffle
from dp_jax.pruning import dense as dense_lib
from dp_jax.pruning import setup as setup_lib
from dp_jax.pruning.plan import REINIT, Start
from dp_jax.storage import fileio
from dp_jax.tasks import prune as experiment
from dp_jax.tasks import settings as settings_lib

from conftest import ROOT, load_config_module

METHODS = ("imp:k=2,snip,grasp,mag_init,synflow:iters=5,shuffle:of=imp_k2,invert:of=imp_k2,"
           "invert:of=snip,invert:of=grasp,invert:of=mag_init,invert:of=synflow,"
           "subset:n=20;select=herding")
OVERRIDES = ["--config.data.train_size=0", "--config.train.batch_size=40",
             "--config.train.epochs=2", "--config.train.eval_batch_size=64",
             "--config.dp.lr=0.01", "--config.dp.steps=10", "--config.dp.batch_size=10"]


def _config(toy_npz, method=METHODS):
    """The config the command line below runs (for building contexts in-process)."""
    c = load_config_module("fashion_mnist").get_config("smoke")
    c.data.name, c.data.train_size = f"npz:{toy_npz}", 0
    c.train.batch_size, c.train.epochs, c.train.eval_batch_size = 40, 2, 64
    c.dp.lr, c.dp.steps, c.dp.batch_size = 0.01, 10, 10
    c.prune.method = method
    return c


@pytest.fixture(scope="module")
def run(toy_npz, tmp_path_factory):
    """One workdir made by the command line with every new method (2 rounds of 50 %)."""
    wd = str(tmp_path_factory.mktemp("controls") / "wd")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "dp_jax.main", "--config=configs/fashion_mnist.py:smoke",
           f"--workdir={wd}", f"--config.data.name=npz:{toy_npz}",
           f"--config.prune.method={METHODS}"] + OVERRIDES
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return wd, _config(toy_npz)


def _rows(wd, label):
    return sorted((r for r in fileio.read_jsonl(os.path.join(wd, "rounds.jsonl"))
                   if r["method"] == label), key=lambda r: r["round"])


def _mask(wd, label, rnd):
    with np.load(os.path.join(wd, "runs", f"{label}-seed0", "masks", f"round_{rnd:03d}.npz")) as z:
        return {k: z[k] for k in z.files if k.endswith("kernel")}


def _context(c, wd, rewind=(2,)):
    settings = settings_lib.parse(c)
    setup = setup_lib.build_setup(settings, setup_lib.load_data(settings))
    dense = dense_lib.dense_run(setup, wd, 0, list(rewind))
    return methods.Context(setup=setup, workdir=wd, seed=0, seed_key=rng.seed_key(0),
                           dense=dense, config=settings)


def _spec(c, label):
    return next(s for s in settings_lib.parse(c).specs if s.label == label)


def test_every_control_runs_from_the_command_line(run):
    wd, _ = run
    labels = ["imp_k2", "snip", "grasp", "mag_init", "synflow", "shuffle_imp_k2", "invert_imp_k2",
              "invert_snip", "invert_grasp", "invert_mag_init", "invert_synflow",
              "subset_n20_herding"]
    for label in labels:
        rows = _rows(wd, label)
        assert [r["round"] for r in rows] == [0, 1, 2], label
        np.testing.assert_allclose([r["sparsity"] for r in rows], [0, 0.5, 0.75], atol=2e-3)
        for rnd in (1, 2):  # nested masks
            prev, cur = _mask(wd, label, rnd - 1), _mask(wd, label, rnd)
            assert all(not np.any(cur[k] & ~prev[k]) for k in cur), (label, rnd)
    # A control's search is its source's: shuffling is free, inversion scores as the source.
    ex = {label: [r["train_examples"] for r in _rows(wd, label)] for label in labels}
    assert ex["shuffle_imp_k2"] == ex["imp_k2"] == ex["invert_imp_k2"]
    assert ex["invert_snip"] == ex["snip"] == [0, 40, 80]
    assert ex["invert_grasp"] == ex["grasp"]
    assert ex["invert_synflow"] == ex["invert_mag_init"] == [0, 0, 0]
    # The coreset's probe (2 epochs x 5 batches of 40, a feature pass over the 200 images)
    # counts in round 1 only, on top of the inner loop's 10 steps x 10 images per round.
    assert ex["subset_n20_herding"] == [0, 100 + 400 + 200, 100 + 400 + 200 + 100]
    report = open(os.path.join(wd, "report.md")).read()
    for name in ("Shuffled IMP (k=2)", "Inverted GraSP", "Real subset, herding (n=20)",
                 "fewer examples than DP"):
        assert name in report


def test_shuffle_keeps_every_layers_count_and_permutes_with_the_seeds_key(run):
    wd, c = run
    like = _context(c, wd).dense["variables"]["params"]
    perms = shuffle.layer_permutations(like, jax.random.fold_in(rng.seed_key(0), rng.SHUFFLE))
    for rnd in (1, 2):
        src, got = _mask(wd, "imp_k2", rnd), _mask(wd, "shuffle_imp_k2", rnd)
        for k in src:
            assert got[k].sum() == src[k].sum(), (rnd, k)  # exactly the source's count
            # Reproducible: the seed's SHUFFLE key gives this exact permutation.
            np.testing.assert_array_equal(got[k].reshape(-1), src[k].reshape(-1)[perms[k]])
        assert any(not np.array_equal(got[k], src[k]) for k in src)


def _hypergeometric_sd(n, c):
    """Standard deviation of the overlap of two random c-subsets of n positions."""
    return math.sqrt(c * (c / n) * ((n - c) / n) * ((n - c) / max(n - 1, 1)))


def test_shuffled_overlap_with_the_source_is_the_density(run):
    wd, _ = run
    for rnd in (1, 2):
        src, got = _mask(wd, "imp_k2", rnd), _mask(wd, "shuffle_imp_k2", rnd)
        for k in src:
            n, c = src[k].size, int(src[k].sum())
            overlap = int(np.sum(src[k] & got[k]))
            # A uniformly random layout keeps a kept weight with probability c/n.
            assert abs(overlap - c * c / n) <= 5 * _hypergeometric_sd(n, c) + 1, (rnd, k)


def test_shuffle_is_uniform_over_many_keys_and_differs_between_seeds():
    rs = np.random.default_rng(0)
    mask = {"a": {"kernel": rs.random((60, 50)) < 0.3}, "a2": {"bias": np.ones(50, bool)}}
    n, c = 3000, int(mask["a"]["kernel"].sum())
    overlaps = []
    for seed in range(40):
        perms = shuffle.layer_permutations(mask, jax.random.key(seed))
        got = shuffle.shuffle_mask(mask, perms)
        assert int(np.sum(got["a"]["kernel"])) == c
        np.testing.assert_array_equal(got["a2"]["bias"], mask["a2"]["bias"])  # not prunable
        overlaps.append(int(np.sum(np.asarray(got["a"]["kernel"]) & mask["a"]["kernel"])))
    sd_of_mean = _hypergeometric_sd(n, c) / len(overlaps) ** 0.5
    assert np.mean(overlaps) == pytest.approx(c * c / n, abs=5 * sd_of_mean)
    again = shuffle.shuffle_mask(mask, shuffle.layer_permutations(mask, jax.random.key(0)))
    first = shuffle.shuffle_mask(mask, shuffle.layer_permutations(mask, jax.random.key(0)))
    np.testing.assert_array_equal(again["a"]["kernel"], first["a"]["kernel"])
    assert len(set(overlaps)) > 1  # other keys, other layouts


def test_controls_train_from_their_sources_start_point(run):
    wd, c = run
    ctx = _context(c, wd)
    plans = {label: methods.get(_spec(c, label).name).plan(_spec(c, label), ctx)
             for label in ("imp_k2", "shuffle_imp_k2", "invert_imp_k2", "grasp", "invert_grasp")}
    k2, at_k2 = plans["imp_k2"].start_point(1), ctx.dense["snapshots"][2]
    for label in ("shuffle_imp_k2", "invert_imp_k2"):
        v, step = plans[label].start_point(1)
        assert step == k2[1] == 2
        jax.tree.map(np.testing.assert_array_equal, v, k2[0])
        assert methods.get(label.split("_")[0]).start(_spec(c, label)) == Start("rewind", 2)
    jax.tree.map(np.testing.assert_array_equal, k2[0], at_k2)
    init = ctx.dense["variables"]
    assert not np.array_equal(at_k2["params"]["fc1"]["kernel"], init["params"]["fc1"]["kernel"])
    v, step = plans["invert_grasp"].start_point(1)
    assert step == 0
    jax.tree.map(np.testing.assert_array_equal, v, plans["grasp"].start_point(1)[0])


def test_shuffle_of_a_reinit_trains_from_the_same_fresh_init(toy_npz):
    c = _config(toy_npz, "imp,reinit:of=imp_k0,shuffle:of=reinit_imp_k0")
    specs = settings_lib.parse(c).specs
    assert methods.get("shuffle").start(specs[2]) == REINIT


def _numpy_inverse_keep(scores: dict, fraction: float) -> dict:
    """Round 1 from the dense mask, inverted, by plain NumPy: one global ranking, the
    round(fraction * total) highest scores removed (ties: the earlier position first)."""
    flat = np.concatenate([np.asarray(v, np.float64).reshape(-1) for v in scores.values()])
    n_prune = int(round(fraction * flat.size))
    order = np.lexsort((np.arange(flat.size), -flat))
    keep = np.ones(flat.size, bool)
    keep[order[:n_prune]] = False
    out, off = {}, 0
    for k, v in scores.items():
        out[k] = keep[off:off + np.size(v)].reshape(np.shape(v))
        off += np.size(v)
    assert all(v.any() for v in out.values())  # no layer emptied: the collapse guard is idle
    return out


def test_inverted_masks_are_the_complement_ranking_of_the_sources_scores(run):
    wd, c = run
    ctx = _context(c, wd)
    setup, init = ctx.setup, ctx.dense["variables"]
    dense_mask = masks.ones_like(init["params"])
    batches = scored.score_batches(
        setup, jax.random.fold_in(jax.random.fold_in(ctx.seed_key, rng.SCORE), 1),
        int(c.prune.score_batches))
    sources = {
        "snip": saliency.snip_scores(setup.model, init, dense_mask, batches),
        "grasp": saliency.grasp_scores(setup.model, init, dense_mask, batches),
        "mag_init": masks.magnitude_scores(init["params"]),
        "imp_k2": masks.magnitude_scores(ctx.dense["trained"]["params"]),  # round 1's source
    }
    for label, scores in sources.items():
        want = _numpy_inverse_keep(masks.prunable_leaves(scores), c.prune.fraction)
        got = _mask(wd, f"invert_{label}", 1)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{label} {k}")
        # At 50 % of an even count the inversion keeps exactly what the source removes.
        src = _mask(wd, label, 1)
        assert all(np.array_equal(got[k], ~src[k]) for k in src), label
    # GraSP's sign: the inverted run keeps the lowest theta * Hg, which GraSP removes first.
    g = np.concatenate([np.asarray(v).reshape(-1) for v in
                        masks.prunable_leaves(sources["grasp"]).values()])
    kept = np.concatenate([v.reshape(-1) for v in _mask(wd, "invert_grasp", 1).values()])
    assert g[kept].max() <= g[~kept].min()


def test_inverted_synflow_prunes_the_highest_flow(run, toy_npz):
    wd, _ = run
    # One iteration per round: exactly the complement ranking of the init's synaptic flow.
    c = _config(toy_npz, "synflow:iters=1,invert:of=synflow")
    ctx = _context(c, wd, rewind=())
    plan = methods.get("invert").plan(_spec(c, "invert_synflow"), ctx)
    dense_mask = masks.ones_like(ctx.dense["variables"]["params"])
    got = plan.next_mask(1, dense_mask, ctx.dense["trained"])
    flow = saliency.synflow_scores(ctx.setup.model, ctx.dense["variables"], dense_mask,
                                   ctx.setup.image_shape)
    want = _numpy_inverse_keep(masks.prunable_leaves(flow), c.prune.fraction)
    for k, v in masks.prunable_leaves(got).items():
        np.testing.assert_array_equal(np.asarray(v), want[k], err_msg=k)
    # Five iterations re-score the inverted mask: far from the source's, well below chance.
    src, inv = _mask(wd, "synflow", 1), _mask(wd, "invert_synflow", 1)
    n, kept = sum(v.size for v in src.values()), sum(int(v.sum()) for v in src.values())
    overlap = sum(int(np.sum(src[k] & inv[k])) for k in src)
    assert overlap < kept * kept / n - 5 * _hypergeometric_sd(n, kept)


@pytest.mark.parametrize("entry,match", [
    ("shuffle", r"shuffle needs of=LABEL naming a run listed before it"),
    ("shuffle:of=imp_k0,imp", r"shuffle:of=imp_k0 needs the run 'imp_k0' listed before it"),
    ("invert:of=snip", r"invert:of=snip needs the run 'snip' listed before it"),
    ("random,invert:of=random", r"'random' has no scores to invert; allowed sources: runs of "
                                r"imp, snip, grasp, synflow, mag_init"),
    ("dp,invert:of=dp", r"'dp' has no scores to invert"),
    ("subset:n=20,invert:of=subset_n20", r"'subset' has no scores to invert"),
    ("imp,reinit:of=imp_k0,invert:of=reinit_imp_k0", r"'reinit' has no scores to invert"),
    ("imp,shuffle:of=imp_k0,invert:of=shuffle_imp_k0", r"'shuffle' has no scores to invert"),
    ("lrr,invert:of=lrr", r"'lrr' has no scores to invert"),
    ("dp:k=3,shuffle:of=dp", r"the run 'dp' trains from step 3, which its label does not say"),
])
def test_bad_control_entries_fail_before_any_work(tiny_config, tmp_path, entry, match):
    tiny_config.prune.method = entry
    wd = tmp_path / "wd"
    with pytest.raises(ValueError, match=match):
        experiment.run(tiny_config, str(wd))
    assert not wd.exists()
