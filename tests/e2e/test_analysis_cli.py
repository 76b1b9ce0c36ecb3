"""End to end: ``python -m dp_jax.analysis`` on a tiny finished workdir.

The workdir is made by the real experiment entry function on a generated npz
dataset (8x8 grayscale; LeNet-300-100, and a BatchNorm ConvNet of width 4 in the
slow variant), with IMP at k=0 and k=3 and random pruning, so the CLI exercises
rewind points from the dense checkpoint, BatchNorm recomputation and every analysis.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dp_jax.pruning import dense
from dp_jax.tasks import prune as experiment
from dp_jax.pruning import setup as setup_lib

from conftest import load_config_module

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(npz_path: str, model: str = "convnet_bn"):
    c = load_config_module("fashion_mnist").get_config("smoke")
    c.data.name = f"npz:{npz_path}"
    c.data.train_size = 0
    if model == "convnet_bn":
        c.model.name = "convnet"
        c.model.width = 4
        c.model.depth = 2
        c.model.norm = "batch"
    c.train.epochs = 2
    c.train.batch_size = 20
    c.train.eval_batch_size = 50
    c.train.lr = 0.02
    c.prune.rounds = 1
    c.prune.method = "imp,imp:k=3,random"
    return c


# LeNet compiles quickly and runs by default; the BatchNorm ConvNet adds the
# recomputed statistics and conv programs (about a minute on a loaded 2-core CPU).
@pytest.fixture(scope="module", params=["lenet_300_100",
                                        pytest.param("convnet_bn", marks=pytest.mark.slow)])
def workdir(request, tmp_path_factory):
    d = tmp_path_factory.mktemp("analysis_cli")
    rng = np.random.default_rng(0)
    npz = str(d / "data.npz")
    protos = rng.uniform(0, 255, (4, 8, 8))

    def split(n):
        y = rng.integers(0, 4, n)
        x = np.clip(protos[y] + rng.normal(0, 60, (n, 8, 8)), 0, 255).astype(np.uint8)
        return x, y

    (xt, yt), (xv, yv) = split(100), split(60)
    np.savez(npz, x_train=xt, y_train=yt, x_test=xv, y_test=yv)
    wd = str(d / "wd")
    experiment.run(_config(npz, request.param), wd)
    return wd, request.param == "convnet_bn"


def test_cli_writes_json_plots_and_report_section(workdir):
    workdir, has_bn = workdir
    with open(os.path.join(workdir, "report.md")) as f:
        before = f.read()
    cmd = [sys.executable, "-m", "dp_jax.analysis", f"--workdir={workdir}",
           "--hessian_examples=40", "--lanczos_steps=6", "--landscape_grid=3",
           "--landscape_examples=30", "--k_values=0,3", "--rounds=0,1"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    adir = os.path.join(workdir, "analysis")
    for label in ("imp_k0", "imp_k3", "random"):
        for rnd in (0, 1):
            stem = f"{label}-seed0-round{rnd:03d}"
            inst = json.load(open(os.path.join(adir, f"instability_{stem}.json")))
            assert {"alphas", "error", "barrier", "loss", "loss_barrier", "layerwise",
                    "l2_distance"} <= set(inst)
            assert len(inst["alphas"]) == 11 and len(inst["error"]) == 11
            if has_bn:
                assert set(inst["bn_modes"]) == {"recompute", "interpolate"}
                assert inst["bn_mode"] == "recompute"
            else:
                assert inst["bn_mode"] == "none" and "bn_modes" not in inst
            hess = json.load(open(os.path.join(adir, f"hessian_{stem}.json")))
            assert {"top_eigenvalues", "trace", "density"} <= set(hess)
            assert os.path.exists(os.path.join(adir, f"landscape_{stem}_directions.npz"))
            land = json.load(open(os.path.join(adir, f"landscape_{stem}.json")))
            assert np.asarray(land["plane"]["loss"]).shape == (3, 3)
            assert os.path.exists(os.path.join(workdir, "plots", f"landscape_{stem}.png"))
    # Copy 0 retraces the run's own evaluation training.
    inst = json.load(open(os.path.join(adir, "instability_imp_k3-seed0-round001.json")))
    assert inst["start_step"] == 3
    assert inst["copy_test_error"][0] == pytest.approx(1 - inst["record_test_accuracy"], abs=0.02)
    curve = json.load(open(os.path.join(adir, "instability_dense_k_seed0.json")))
    assert curve["k"] == [0, 3] and len(curve["barrier"]) == 2
    assert os.path.exists(os.path.join(adir, "masks.json"))
    for name in ("instability_barrier", "instability_curves", "instability_dense_k", "hessian",
                 "hessian_density", "accuracy_vs_sparsity"):
        assert os.path.getsize(os.path.join(workdir, "plots", f"{name}.png")) > 1000
    with open(os.path.join(workdir, "report.md")) as f:
        after = f.read()
    assert after.startswith(before.rstrip())  # the experiment's report is kept
    assert after.count("<!-- analysis -->") == 1 and "<!-- /analysis -->" in after
    assert "Instability" in after and "Hessian" in after


def test_cli_rejects_bad_selection(workdir):
    from dp_jax.tasks import analyze as run_lib
    workdir, _ = workdir
    with pytest.raises(ValueError, match="unknown run"):
        run_lib.run(workdir, runs=["nope"])
    with pytest.raises(ValueError, match="analyses"):
        run_lib.run(workdir, analyses=["sharpness"])
    with pytest.raises(ValueError, match="rounds"):
        run_lib.run(workdir, rounds=[7])


def test_retrained_dense_snapshot_matches_the_checkpoint(workdir):
    """The k-curve retrains the dense net; it must reach the weights IMP rewound to."""
    import jax
    import ml_collections
    from dp_jax.storage import fileio
    from dp_jax import rng
    from dp_jax.analysis import instability
    from dp_jax.data import load_dataset

    workdir, _ = workdir
    cfg = ml_collections.ConfigDict(fileio.read_json(os.path.join(workdir, "config.json")))
    setup = setup_lib.build_setup(cfg, load_dataset(cfg.data, seed=cfg.seed))
    saved = dense.dense_run(setup, workdir, 0, [3])["snapshots"][3]
    root = jax.random.key(0)
    init = setup.init_fn(jax.random.fold_in(root, rng.INIT))
    again = instability.dense_snapshots(setup.trainer, setup.tx, init, setup.x_train,
                                        setup.y_train, jax.random.fold_in(root, rng.DATA),
                                        [0, 3])
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(again[3])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def _hessian_settings(**kw):
    from dp_jax.tasks import analyze as run_lib
    return run_lib.Settings(**dict(dict(hessian_examples=40, lanczos_steps=6, top_k=2,
                                        trace_probes=2, slq_probes=1), **kw))


def test_hessian_reads_the_kept_checkpoint_and_trains_nothing(workdir, monkeypatch):
    from dp_jax.analysis import instability, resume
    from dp_jax.tasks import analyze as run_lib
    workdir, _ = workdir

    def no_training(*a, **k):
        raise AssertionError("a copy was trained although the round's weights are kept")
    monkeypatch.setattr(instability, "spawn_copies", no_training)
    out = run_lib.run(workdir, analyses=["hessian"], runs=["imp_k0"], rounds=[1],
                      settings=_hessian_settings())
    h = out["results"]["imp_k0-seed0-round001"]["hessian"]
    assert h["trained_weights"] == "kept checkpoint"
    # Those weights are the run's: evaluated, they give the recorded test accuracy.
    import ml_collections
    from dp_jax.storage import fileio
    from dp_jax import masks
    from dp_jax.data import load_dataset
    cfg = ml_collections.ConfigDict(fileio.read_json(os.path.join(workdir, "config.json")))
    setup = setup_lib.build_setup(cfg, load_dataset(cfg.data, seed=cfg.seed))
    like = setup.init_fn(__import__("jax").random.key(0))
    w = resume.kept_trained(workdir, "imp_k0", 0, 1, {"params": like["params"],
                                                      "batch_stats": like.get("batch_stats", {})})
    mask = masks.load(os.path.join(workdir, "runs", "imp_k0-seed0", "masks", "round_001.npz"),
                      like["params"])
    ev = setup.trainer.evaluate(w["params"], w["batch_stats"], mask, setup.x_test, setup.y_test)
    assert ev["accuracy"] == pytest.approx(h["record_test_accuracy"], abs=1e-6)


def test_analysis_resumes_per_mask(workdir, monkeypatch):
    from dp_jax.tasks import analyze as run_lib
    workdir, _ = workdir
    sel = dict(analyses=["hessian"], runs=["imp_k3", "random"], rounds=[1])
    run_lib.run(workdir, settings=_hessian_settings(), **sel)
    calls = []
    real = run_lib._compute
    monkeypatch.setattr(run_lib, "_compute", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    first = json.load(open(os.path.join(workdir, "analysis",
                                        "hessian_random-seed0-round001.json")))
    again = run_lib.run(workdir, settings=_hessian_settings(), **sel)
    assert calls == []  # both masks finished: nothing recomputed
    assert again["results"]["random-seed0-round001"]["hessian"] == first
    # A damaged output: only that mask is recomputed, to the same result.
    path = os.path.join(workdir, "analysis", "hessian_random-seed0-round001.json")
    with open(path, "a") as f:
        f.write(" ")
    run_lib.run(workdir, settings=_hessian_settings(), **sel)
    assert len(calls) == 1
    redone = json.load(open(path))
    assert redone["top_eigenvalues"] == pytest.approx(first["top_eigenvalues"], rel=1e-6)
    # Other settings: every selected mask is recomputed.
    run_lib.run(workdir, settings=_hessian_settings(lanczos_steps=7), **sel)
    assert len(calls) == 3
