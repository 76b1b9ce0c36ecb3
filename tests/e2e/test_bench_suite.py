"""benchmarks/suite.py's plumbing: every part's command, the JSON it reads back, the table's sums.

The measurements themselves are benchmarks (run by hand), never tests; this checks that the
suite runs what it says and computes each ratio and peak fraction from the parts' figures.
"""

import importlib.util
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks")


def _load(name):
    sys.path.insert(0, BENCH)
    try:
        spec = importlib.util.spec_from_file_location(name, os.path.join(BENCH, f"{name}.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(BENCH)


@pytest.mark.parametrize("backend,quick", [("cpu", True), ("cpu", False), ("gpu", True)])
def test_every_part_runs_an_existing_script(backend, quick):
    suite = _load("suite")
    cmds = suite.part_commands(backend, quick, torch=False)
    assert set(cmds) == set(suite.PARTS)
    for name, cmd in cmds.items():
        assert os.path.exists(os.path.join(BENCH, cmd[0])), name
        if "--threads" in cmd:
            assert cmd[cmd.index("--threads") + 1] == ("1" if backend == "cpu" else "2")
    assert "--no-torch" in cmds["train"] and "--no-torch" in cmds["dp_inner"]


def test_last_json_skips_progress_lines():
    suite = _load("suite")
    text = 'progress {"step": 1}\n{"a": 1}\nnot json\n{"b": {"c": 2}}\n'
    assert suite.last_json(text) == {"b": {"c": 2}}
    with pytest.raises(ValueError):
        suite.last_json("no object here")


def test_table_ratios_and_peak_fractions_are_computed_from_the_parts():
    table = _load("suite_table")
    res = {"backend": "cpu", "quick": True, "malloc": "hugetlb", "wall_s": 600.0,
           "peak_gflops": 100.0, "parts": {
               "peak": {"ok": True, "result": {"jax": {}}},
               "train": {"ok": True, "result": {"models": {"convnet128": {
                   "flops_per_image": 2e8,
                   "ours": {"scan": {"images_per_s": 150.0, "cpu_util": 1.0}},
                   "torch": {"images_per_s": 100.0},
                   "ratio_ours_over_torch": {"best_loop": "scan"}}}}},
               "seeds": {"ok": True, "result": {"models": {"lenet_300_100": {
                   "seeds": 4, "loop": "scan", "speedup": 0.5,
                   "vmapped": {"items_per_s": 10.0}, "sequential": {"items_per_s": 20.0}}}}},
               "mtt": {"ok": False, "wall_s": 1.0, "error": "boom"}}}
    md = table.markdown(res)
    # 150 img/s x 0.2 GFLOP = 30 GFLOP/s = 30 % of 100; torch 20 %; 150 / 100 = 1.50x.
    assert "| 1.50x | 30 % (torch 20 %) |" in md
    assert "0.50x" in md and "malloc hugetlb" in md and "10.0 min" in md
    assert "**mtt failed**: boom" in md
