"""The distillation comparison: budgets include experts, gaps are distilled minus random, and a
directory that is not a finished distillation is refused before anything is written."""

import json
import os

import pytest

from dp_jax.cli import distill_tools
from dp_jax.reports import distill_compare as compare


def _workdir(root, name, *, method, expert_wall, distill_wall, evals, final, random,
             random_stored=None):
    wd = os.path.join(root, name)
    os.makedirs(wd)
    summary = {"task": "distill", "method": method, "model": {"name": "lenet_300_100"},
               "images": 100, "ipc": 10, "factor": 1,
               "cost": {"expert_wall_s": expert_wall, "expert_cpu_s": expert_wall * 0.9,
                        "distill_wall_s": distill_wall, "distill_cpu_s": distill_wall * 0.8},
               "results": {"distilled": {"accuracy_mean": final, "accuracy_std": 0.01,
                                         "accuracies": [final] * 3},
                           "random": {"accuracy_mean": random, "accuracy_std": 0.0,
                                      "accuracies": [random] * 3}}}
    if random_stored is not None:
        summary["results"]["random_stored"] = {"accuracy_mean": random_stored,
                                               "accuracy_std": 0.0, "accuracies": [random_stored]}
    with open(os.path.join(wd, "summary.json"), "w") as f:
        json.dump(summary, f)
    with open(os.path.join(wd, "config.json"), "w") as f:
        json.dump({"distill": {"iterations": 300}}, f)
    with open(os.path.join(wd, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"phase": "distill", "iteration": 10, "loss": 1.0}) + "\n")
        for it, wall, acc in evals:
            f.write(json.dumps({"phase": "distill_eval", "iteration": it, "distill_wall_s": wall,
                                "accuracy_mean": acc, "accuracy_std": 0.0}) + "\n")
    return wd


def test_table_and_curve_count_experts_and_compare_with_random(tmp_path):
    a = _workdir(str(tmp_path), "mtt_run", method="mtt", expert_wall=100.0, distill_wall=200.0,
                 evals=[(100, 60.0, 0.70), (200, 130.0, 0.74)], final=0.78, random=0.72)
    b = _workdir(str(tmp_path), "dm_run", method="dm", expert_wall=0.0, distill_wall=50.0,
                 evals=[], final=0.75, random=0.78, random_stored=0.72)  # factor > 1
    out = str(tmp_path / "out")
    assert distill_tools.compare_main([a, b, "--out", out]) == 0
    run = compare.load_run(a)
    # Periodic points sit at experts + distillation so far; the final one at the whole budget.
    assert [(x, y, it) for x, y, _, it in run["curve"]] == [
        (160.0, 0.70, 100), (230.0, 0.74, 200), (300.0, 0.78, 300)]
    text = open(os.path.join(out, "compare.md")).read()
    rows = [line for line in text.splitlines() if line.startswith("| mtt_run") or
            line.startswith("| dm_run")]
    assert "+6.00" in rows[0] and "78.00 ± 1.00 (3)" in rows[0] and "100 / 90" in rows[0]
    assert "+3.00" in rows[1] and "50 / 40" in rows[1]  # the gap is at equal storage
    assert os.path.getsize(os.path.join(out, "accuracy_vs_budget.png")) > 0


def test_a_directory_that_is_not_a_distillation_is_refused(tmp_path, capsys):
    good = _workdir(str(tmp_path), "ok", method="gm", expert_wall=0.0, distill_wall=5.0,
                    evals=[], final=0.7, random=0.6)
    bad = tmp_path / "pruning_run"
    bad.mkdir()
    (bad / "summary.json").write_text(json.dumps({"methods": {}}))
    out = tmp_path / "out"
    assert distill_tools.compare_main([good, str(bad), "--out", str(out)]) == 2
    assert "not a distillation summary" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(ValueError, match="no summary.json"):
        compare.load_run(str(tmp_path / "missing"))
