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


def test_library_kernels_names_the_fastest_setting_and_the_patch_rule_ratio(monkeypatch):
    lk = _load("library_kernels")
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false "
                                    "--xla_cpu_experimental_ynn_fusion_type=-reduce")
    assert lk._env("default")["XLA_FLAGS"] == "--xla_cpu_multi_thread_eigen=false"
    assert lk._env("-reduce")["XLA_FLAGS"].split()[-1] == (
        "--xla_cpu_experimental_ynn_fusion_type=-reduce")
    assert lk._env("onednn_dot")["XLA_FLAGS"].split() == [
        "--xla_cpu_multi_thread_eigen=false", "--xla_cpu_experimental_ynn_fusion_type=",
        "--xla_cpu_use_onednn=true", "--xla_cpu_experimental_onednn_fusion_type=dot"]

    def row(r32, ips32, ips32_wide, r_inner, r_res):
        return {"train": {"convnet32": {"ratio_to_torch": r32, "images_per_s": ips32},
                          "convnet128": {"ratio_to_torch": 0.8, "images_per_s": 10.0}},
                "dp_inner_convnet32": {"ratio_to_torch_per_cpu_s": r_inner},
                "resnet18_w32": {"ratio_to_torch": r_res, "images_per_s": 5.0},
                "patch_rule": {"convnet32_wide32": {"convnet32": {"images_per_s": ips32_wide}},
                               "convnet128_rule_on": {"convnet128": {"images_per_s": 15.0}},
                               "resnet18_w32_rule_on": {"images_per_s": 4.0}}}

    s = lk.summarize({"default": row(1.0, 100.0, 50.0, 1.4, 0.5),
                      "-reduce": row(0.9, 90.0, 90.0, 1.5, 0.6)})
    assert s["fastest"]["convnet32 training"]["setting"] == "default"
    assert s["fastest"]["dp inner loop convnet32"]["setting"] == "-reduce"
    assert s["fastest"]["resnet18 w32 training"]["setting"] == "-reduce"
    rule = s["patch_rule_speed_ratio"]
    assert rule["default"]["convnet32: wide32 / current"] == pytest.approx(0.5)
    assert rule["-reduce"]["convnet32: wide32 / current"] == pytest.approx(1.0)
    assert rule["default"]["convnet128: rule at 64 / current"] == pytest.approx(1.5)
    assert rule["default"]["resnet18: rule at 64 / current"] == pytest.approx(0.8)
