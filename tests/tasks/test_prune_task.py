"""The experiment runner end to end: contract files, validation, resume after a kill."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dp_jax.tasks import prune as experiment
from dp_jax.storage import fileio

from conftest import ROOT, assert_rejected, kill_then_resume, load_config_module, make_distilled


from dp_jax.pruning.records import TIMINGS  # noqa: E402


def _strip(rows):
    """Records without their timings (which differ between any two runs)."""
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in rows]


def test_end_to_end_contract(tiny_config, tmp_path):
    wd = str(tmp_path / "wd")
    tiny_config.prune.method = "imp,imp:k=3,random,reinit:of=imp_k0"
    summary = experiment.run(tiny_config, wd)
    for f in ("config.json", "metrics.jsonl", "rounds.jsonl", "summary.json", "report.md",
              "plots/accuracy_vs_sparsity.png"):
        assert os.path.exists(os.path.join(wd, f)), f
    rows = fileio.read_jsonl(os.path.join(wd, "rounds.jsonl"))
    labels = {"imp_k0", "imp_k3", "random", "reinit_imp_k0"}
    assert {r["method"] for r in rows} == labels
    keys = {"method", "round", "sparsity", "test_accuracy", "test_loss", "train_examples",
            "wall_s", "seed"}
    assert all(keys <= set(r) for r in rows)
    for label in labels:
        rs = sorted((r for r in rows if r["method"] == label), key=lambda r: r["round"])
        # fraction 0.5 per round: sparsity 0, 0.5, 0.75.
        np.testing.assert_allclose([r["sparsity"] for r in rs], [0, 0.5, 0.75], atol=1e-3)
        masks_dir = os.path.join(wd, "runs", f"{label}-seed0", "masks")
        assert sorted(os.listdir(masks_dir)) == [f"round_{i:03d}.npz" for i in range(3)]
    # Round 0 is the same dense network for every method of a seed.
    assert len({r["test_accuracy"] for r in rows if r["round"] == 0}) == 1
    # Accounting: the mask of round r costs the trainings of rounds 0..r-1
    # (2 epochs x 5 steps x 40 examples each; after rewinding to step 3, 7 steps).
    imp = sorted((r for r in rows if r["method"] == "imp_k0"), key=lambda r: r["round"])
    assert [r["train_examples"] for r in imp] == [0, 400, 800]
    k3 = sorted((r for r in rows if r["method"] == "imp_k3"), key=lambda r: r["round"])
    assert [r["train_examples"] for r in k3] == [0, 400, 400 + 7 * 40]
    assert all(r["train_examples"] == 0 for r in rows if r["method"] == "random")
    # reinit reuses the IMP masks exactly.
    for rnd in range(3):
        a = np.load(os.path.join(wd, "runs", "imp_k0-seed0", "masks", f"round_{rnd:03d}.npz"))
        b = np.load(os.path.join(wd, "runs", "reinit_imp_k0-seed0", "masks", f"round_{rnd:03d}.npz"))
        assert all(np.array_equal(a[k], b[k]) for k in a.files)
    assert summary["methods"]["imp_k0"]["final_sparsity"] == pytest.approx(0.75, abs=1e-3)
    assert json.load(open(os.path.join(wd, "config.json")))["prune"]["rounds"] == 2
    # The toy task is learnable: the dense net beats chance clearly.
    assert rows[0]["test_accuracy"] > 0.3
    # Re-running a finished workdir trains nothing and leaves the results unchanged.
    before = _strip(fileio.read_jsonl(os.path.join(wd, "rounds.jsonl")))
    experiment.run(tiny_config, wd)
    assert _strip(fileio.read_jsonl(os.path.join(wd, "rounds.jsonl"))) == before


@pytest.mark.parametrize("field,value,match", [
    ("model.name", "vgg", "model.name"),
    ("prune.method", "imp,magic", "prune.method"),
    ("data.name", "mnist", "data.name"),
    ("prune.rounds", -1, "prune.rounds"),
    ("prune.fraction", 1.0, "prune.fraction"),
    ("prune.fraction", 0.0, "prune.fraction"),
    ("prune.rewind_step", 10_000, "rewind_step"),
    ("train.batch_size", 5000, "train.batch_size"),
    ("train.optimizer", "rmsprop", "train.optimizer"),
    ("prune.scope", "local", "prune.scope"),
    ("model.width", 16, "width"),  # lenet accepts no width
])
def test_invalid_config_fails_before_work(tiny_config, tmp_path, field, value, match):
    assert_rejected(tiny_config, field, value, match, tmp_path / "wd")


def test_missing_npz_names_the_file(tiny_config, tmp_path):
    tiny_config.data.name = f"npz:{tmp_path}/nope.npz"
    with pytest.raises((ValueError, FileNotFoundError), match="nope.npz"):
        experiment.run(tiny_config, str(tmp_path / "wd"))


def _cli(wd, *overrides):
    return [sys.executable, "-m", "dp_jax.main", "--config=configs/fashion_mnist.py:smoke",
            f"--workdir={wd}", *overrides]


@pytest.mark.slow  # tests/tasks/test_resume_metrics.py kills the CLI at several points by default
def test_resume_after_kill_matches_uninterrupted(toy_npz, tmp_path):
    base = load_config_module("fashion_mnist").get_config("smoke")
    base.data.name = f"npz:{toy_npz}"
    base.data.train_size = 0
    syn = make_distilled(base, str(tmp_path / "syn.npz"))
    overrides = [f"--config.data.name=npz:{toy_npz}", "--config.data.train_size=0",
                 "--config.train.batch_size=40", "--config.prune.rounds=3",
                 "--config.prune.method=imp,synflow:iters=3,random,dp",
                 f"--config.distill.path={syn}",
                 "--config.dp.steps=20"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    ref = tmp_path / "ref"
    subprocess.run(_cli(ref, *overrides), cwd=ROOT, env=env, check=True, capture_output=True)
    wd = tmp_path / "killed"
    # Kill mid-run: IMP finished, SynFlow (a registry method) after its first pruned round.
    kill_then_resume(_cli(wd, *overrides), str(wd),
                     str(wd / "runs" / "synflow-seed0" / "checkpoints" / "1"), env, timeout=120)
    assert _strip(fileio.read_jsonl(str(wd / "rounds.jsonl"))) == \
        _strip(fileio.read_jsonl(str(ref / "rounds.jsonl")))
    for run in ("imp_k0-seed0", "random-seed0", "dp-seed0", "synflow-seed0"):
        for rnd in range(4):
            a = np.load(ref / "runs" / run / "masks" / f"round_{rnd:03d}.npz")
            b = np.load(wd / "runs" / run / "masks" / f"round_{rnd:03d}.npz")
            assert sorted(a.files) == sorted(b.files)
            assert all(np.array_equal(a[k], b[k]) for k in a.files)
