"""Set quality vs mask quality: the pairing reads the right rounds and seeds, the fit equals a
hand-computed least-squares line, and bad pairs are refused before anything is written."""

import json
import os

import numpy as np
import pytest

from dp_jax.cli import distill_tools
from dp_jax.reports import distill_quality as quality


def _set(root, name, acc, random_acc):
    wd = os.path.join(root, name)
    os.makedirs(wd)
    with open(os.path.join(wd, "summary.json"), "w") as f:
        json.dump({"task": "distill", "results": {
            "distilled": {"accuracy_mean": acc, "accuracy_std": 0.01},
            "random": {"accuracy_mean": random_acc, "accuracy_std": 0.02}}}, f)
    return wd


def _pruning(root, name, label, accs_by_sparsity):
    wd = os.path.join(root, name)
    os.makedirs(wd)
    with open(os.path.join(wd, "rounds.jsonl"), "w") as f:
        for rnd, (sp, accs) in enumerate(accs_by_sparsity.items()):
            for seed, a in enumerate(accs):
                f.write(json.dumps({"method": label, "round": rnd, "seed": seed,
                                    "sparsity": sp, "test_accuracy": a}) + "\n")
                f.write(json.dumps({"method": "imp_k0", "round": rnd, "seed": seed,
                                    "sparsity": sp, "test_accuracy": 0.0}) + "\n")
    return wd


def test_pairs_read_the_right_rows_and_the_fit_is_least_squares(tmp_path):
    root = str(tmp_path)
    a = _set(root, "a", 0.70, 0.60)
    b = _set(root, "b", 0.80, 0.60)
    pa = _pruning(root, "pa", "dp", {0.8926: [0.85, 0.87], 0.9560: [0.80, 0.82]})
    pb = _pruning(root, "pb", "dp", {0.8926: [0.88, 0.88], 0.9560: [0.86, 0.84]})
    pr = _pruning(root, "pr", "subset_n100", {0.8926: [0.84], 0.9560: [0.79]})
    out = str(tmp_path / "out")
    assert distill_tools.quality_main([f"a={a},{pa}", f"b={b},{pb}", f"real={a}#random,{pr}:subset_n100",
                         "--out", out]) == 0
    sets = quality.collect([f"a={a},{pa}", f"b={b},{pb}", f"real={a}#random,{pr}:subset_n100"],
                           [0.893, 0.956])
    np.testing.assert_allclose(sets[0]["masks"][0.893], [0.85, 0.87])  # dp rows, both seeds
    np.testing.assert_allclose(quality.mask_accuracy(pa, 0.893, seeds=[1]), [0.87])
    assert sets[2]["set"] == (0.60, 0.02)  # the random-subset baseline of set a
    x = np.array([0.70, 0.80, 0.60])
    y = np.array([0.81, 0.85, 0.79])  # seed means at 95.6 %
    slope = ((x - x.mean()) @ (y - y.mean())) / ((x - x.mean()) @ (x - x.mean()))
    f = quality.fit(x, y)
    np.testing.assert_allclose([f["slope"], f["intercept"]], [slope, y.mean() - slope * x.mean()])
    text = open(os.path.join(out, "quality.md")).read()
    assert "| a | 70.00 ± 1.00 | 86.00 ± 1.41 (2) | 81.00 ± 1.41 (2) |" in text
    assert os.path.getsize(os.path.join(out, "quality_vs_dp.png")) > 0


def test_bad_pairs_are_refused_and_nothing_is_written(tmp_path, capsys):
    root = str(tmp_path)
    a = _set(root, "a", 0.7, 0.6)
    pa = _pruning(root, "pa", "dp", {0.8926: [0.85]})
    out = tmp_path / "out"
    for pair, msg in [(f"x={a},{pa}:nope", "no round of run 'nope'"),
                      (f"x={a}#best,{pa}", "allowed suffix: #random"),
                      (f"x={pa},{pa}", "no summary.json"),
                      (f"x={a}", "expected NAME=")]:
        assert distill_tools.quality_main([pair, f"y={a},{pa}", "--sparsities", "0.893", "--out",
                             str(out)]) == 2
        assert msg in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(ValueError, match="not a pruning workdir"):
        quality.mask_accuracy(a, 0.893)
