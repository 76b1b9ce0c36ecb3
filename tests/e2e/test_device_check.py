"""benchmarks/device_check.sh --dry-run: every step runs at tiny sizes on the CPU and the run
leaves one JSON (versions, peaks, tests, suite, IMP round, DP inner loop) and a markdown table.

Slow: a first run compiles ResNet-18 with DSA on the CPU (~2 minutes on 2 busy cores; about
one once dp_jax's compilation cache holds it)."""

import json
import os
import subprocess

import pytest

from conftest import ROOT

STEPS = ("env", "peaks", "imp", "dp_inner", "pytest_gpu", "readiness", "suite")


@pytest.mark.slow
def test_dry_run_writes_the_json_and_the_table(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    proc = subprocess.run(["bash", "benchmarks/device_check.sh", "--dry-run", "--out", str(out),
                           "--budget-s", "600"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "device_check.json").read_text())
    assert res["benchmark"] == "device_check" and res["dry_run"] is True
    assert {"budget_s", "wall_s", "env", "steps", "summary", "nvidia_smi"} <= set(res)
    env_info = res["env"]
    assert env_info["backend"] == "cpu" and env_info["JAX_PLATFORMS"] == "cpu"
    assert {"jax", "jaxlib", "flax", "optax", "numpy"} <= set(env_info["versions"])
    assert "XLA_FLAGS" in env_info and "cpu_count" in env_info["host"]
    assert env_info["devices"][0]["platform"] == "cpu"

    steps = res["steps"]
    assert list(steps) == list(STEPS)
    assert all(steps[s]["ok"] for s in STEPS), {s: steps[s] for s in STEPS if not steps[s]["ok"]}
    gflops = steps["peaks"]["result"]["gflops"]
    assert set(gflops) == {"bf16", "tf32", "f32", "f32_default"}
    assert all(v > 0 for v in gflops.values())
    imp = steps["imp"]["result"]
    assert imp["images_per_s"] > 0 and 0 < imp["mfu_vs_f32_default_peak"] < 1
    assert imp["compiles_in_masked_round"] == 0          # a new mask recompiles nothing
    assert imp["sparsity_after"] == pytest.approx(0.2, abs=0.01)
    assert len(imp["epoch_s_dense"]) == 2 and len(imp["epoch_s_masked"]) == 2
    dp = steps["dp_inner"]["result"]
    assert dp["steps"] == 3 * (40 // 8) and dp["wall_s"] > 0 and dp["first_call_s"] > 0
    assert dp["compiles_in_second_call"] == 0
    assert isinstance(steps["pytest_gpu"]["tests"], int)  # whatever -m gpu selects (0 today)
    readiness = steps["readiness"]
    assert readiness["tests"] > 0 and readiness["failed"] == readiness["errors"] == 0
    suite = steps["suite"]["result"]
    assert suite["parts"]["peak"]["ok"] and suite["parts"]["peak"]["result"]["peak_gflops"] > 0

    summary = res["summary"]
    assert summary["jax"] == env_info["versions"]["jax"]
    assert summary["imp_images_per_s"] == imp["images_per_s"]
    assert summary["dp_inner_wall_s"] == dp["wall_s"]
    assert all(summary["steps_ok"].values())

    md = (out / "device_check.md").read_text()
    lines = md.splitlines()
    head = lines.index("| check | status | figure | wall s |")
    assert lines[head + 1] == "| --- | --- | --- | --- |"
    rows = [line for line in lines[head + 2:] if line.startswith("| ")]
    names = [r.split("|")[1].strip() for r in rows]
    assert names[:6] == ["env", "matmul peak", "IMP round resnet18 width 4 8x8x3",
                         "DP inner loop resnet18 width 4", "pytest -m gpu", "readiness tests"]
    assert "suite --quick: peak" in names
    assert all(r.split("|")[2].strip() == "ok" for r in rows[:7])
    assert "Device check (dry run, CPU)" in lines[0] and "jax " + summary["jax"] in lines[0]
    for step in STEPS:  # every step left its log
        assert (out / "logs" / f"{'suite_peak' if step == 'suite' else step}.log").exists()
