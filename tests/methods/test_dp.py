"""Distilled Pruning end to end on a tiny distilled set: rounds, nesting, accounting, reuse, errors."""

import os
import shutil

import numpy as np
import pytest

from dp_jax import distill
from dp_jax.tasks import prune as experiment
from dp_jax.storage import fileio

from conftest import make_distilled


@pytest.fixture
def dp_config(tiny_config, tmp_path):
    c = tiny_config
    c.distill.path = make_distilled(c, str(tmp_path / "syn.npz"))
    c.prune.method = "dp,dp_imp,imp"
    c.prune.rounds = 3
    c.dp.steps = 20
    c.dp.batch_size = 10
    c.dp.switch_sparsity = 0.5
    return c


def _rows(wd, label):
    return sorted((r for r in fileio.read_jsonl(os.path.join(wd, "rounds.jsonl")) if r["method"] == label),
                  key=lambda r: r["round"])


def _mask(wd, label, rnd):
    with np.load(os.path.join(wd, "runs", f"{label}-seed0", "masks", f"round_{rnd:03d}.npz")) as z:
        return {k: z[k] for k in z.files}


def test_dp_and_hybrid_end_to_end(dp_config, tmp_path):
    wd = str(tmp_path / "wd")
    experiment.run(dp_config, wd)
    dp = _rows(wd, "dp")
    np.testing.assert_allclose([r["sparsity"] for r in dp], [0, 0.5, 0.75, 0.875], atol=2e-3)
    # DP's search sees 20 steps x 10 distilled images per round, nothing else.
    assert [r["train_examples"] for r in dp] == [0, 200, 400, 600]
    # Nested masks, and round 1 of the hybrid is DP's round 1 (same inner loop, same keys).
    for rnd in range(1, 4):
        prev, cur = _mask(wd, "dp", rnd - 1), _mask(wd, "dp", rnd)
        assert all(not np.any(cur[k] & ~prev[k]) for k in cur)
    m1, h1 = _mask(wd, "dp", 1), _mask(wd, "dp_imp_k0", 1)
    assert all(np.array_equal(m1[k], h1[k]) for k in m1)
    # After the switch (sparsity 0.5 = round 1) the hybrid prunes real-trained weights: IMP's
    # cost per round (2 epochs x 5 steps x 40 examples) is added to DP's.
    hy = _rows(wd, "dp_imp_k0")
    assert [r["train_examples"] for r in hy] == [0, 200, 600, 1000]
    assert not all(np.array_equal(_mask(wd, "dp", 2)[k], _mask(wd, "dp_imp_k0", 2)[k])
                   for k in m1)
    # Search time is cumulative; DP's excludes the evaluation trainings.
    assert all(b["search_s"] >= a["search_s"] for a, b in zip(dp, dp[1:]))
    assert all(r["search_s"] < sum(x["wall_s"] for x in dp[1:]) for r in dp)
    report = open(os.path.join(wd, "report.md")).read()
    assert "Mask agreement" in report and "Distilled Pruning" in report


def test_dp_reuses_distilled_set_in_workdir(dp_config, tmp_path):
    # Also: the Python-driven inner loop (b) finds the scan form's (a) mask.
    dp_config.prune.method = "dp"
    dp_config.prune.rounds = 1
    dp_config.dp.loop = "scan"
    a = str(tmp_path / "a")
    experiment.run(dp_config, a)
    b = str(tmp_path / "b")
    os.makedirs(b)
    shutil.copy(dp_config.distill.path, os.path.join(b, "distilled.npz"))
    dp_config.distill.path = None
    dp_config.dp.loop = "python"
    experiment.run(dp_config, b)
    ma, mb = _mask(a, "dp", 1), _mask(b, "dp", 1)
    assert all(np.array_equal(ma[k], mb[k]) for k in ma)


def test_incompatible_distilled_set_is_refused(dp_config, tmp_path):
    d = distill.load_distilled(dp_config.distill.path)
    bad = str(tmp_path / "bad.npz")
    other = dict(d.preprocessing, mean=[m + 1.0 for m in d.preprocessing["mean"]])
    distill.save_distilled(bad, distill.DistilledSet(d.images, d.labels, d.lr, other, d.dataset))
    dp_config.distill.path = bad
    with pytest.raises(ValueError, match="mean"):
        experiment.run(dp_config, str(tmp_path / "wd"))
    distill.save_distilled(bad, distill.DistilledSet(d.images[:, :4], d.labels, d.lr,
                                                     d.preprocessing, d.dataset))
    with pytest.raises(ValueError, match=r"images \(4, 8, 1\)"):
        experiment.run(dp_config, str(tmp_path / "wd"))


@pytest.mark.parametrize("field,value,match", [
    ("dp.steps", 0, "dp.steps"),
    ("dp.augment", "mixup", "dp.augment"),
    ("dp.loop", "while", "dp.loop"),
    ("dp.switch_sparsity", 0.95, "dp.switch_sparsity"),  # not reached in 3 rounds of 0.5
])
def test_dp_config_errors(dp_config, tmp_path, field, value, match):
    section, name = field.split(".")
    dp_config[section][name] = value
    with pytest.raises(ValueError, match=match):
        experiment.run(dp_config, str(tmp_path / "wd"))
