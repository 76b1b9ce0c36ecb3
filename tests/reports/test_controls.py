"""The report's mask-control section: pairs found from the labels, paired differences against
numpy on hand-written records (rounds a run did not train are left out)."""

import os

import numpy as np
import pytest

from dp_jax.reports import controls


def _row(method, seed, rnd, acc, sparsity=0.5):
    return {"method": method, "seed": seed, "round": rnd, "test_accuracy": acc,
            "sparsity": sparsity}


ROWS = ([_row("dp", s, 0, 0.9, 0.0) for s in range(3)]
        + [_row("dp", s, 1, a) for s, a in enumerate([0.80, 0.82, 0.85])]
        + [_row("shuffle_dp", s, 1, a) for s, a in enumerate([0.78, 0.81, 0.80])]
        + [_row("dp", s, 2, None, 0.75) for s in range(3)]        # not trained
        + [_row("shuffle_dp", s, 2, None, 0.75) for s in range(3)]
        + [_row("imp_k100", 0, 1, 0.9), _row("shuffle_imp_k100", 1, 1, 0.7)]  # no common seed
        + [_row("snip", 0, 1, 0.7), _row("invert_grasp", 0, 1, 0.1)])  # source absent


def test_pairs_come_from_the_labels():
    assert controls.control_pairs({r["method"] for r in ROWS}) == [
        ("shuffle_dp", "dp"), ("shuffle_imp_k100", "imp_k100")]


def test_paired_differences_match_numpy():
    (p,) = controls.paired(ROWS, "shuffle_dp", "dp")
    diff = np.array([0.78, 0.81, 0.80]) - np.array([0.80, 0.82, 0.85])
    assert p["round"] == 1 and p["seeds"] == [0, 1, 2]
    assert p["diff_mean"] == pytest.approx(diff.mean(), abs=1e-12)
    assert p["diff_std"] == pytest.approx(diff.std(ddof=1), abs=1e-12)
    assert controls.paired(ROWS, "shuffle_imp_k100", "imp_k100") == []


def test_section_names_the_pairs_and_writes_the_plot(tmp_path):
    path = str(tmp_path / "plots" / "controls.png")
    text = "\n".join(controls.controls_section(ROWS, path))
    assert "| Shuffled Distilled Pruning | Distilled Pruning | 1 | 50.0% | 82.33 ± 2.52 | " \
           "79.67 ± 1.53 | -2.67 ± 2.08 | 3 |" in text
    assert "IMP" not in text and os.path.getsize(path) > 0
    assert controls.controls_section([r for r in ROWS if "shuffle" not in r["method"]],
                                     path) == []
