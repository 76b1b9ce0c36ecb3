"""Launchers in dry-run mode: the commands they would run, and finished workdirs skipped."""

import json
import os
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT

CONFIG = "configs/cifar_convnet.py:smoke"


def _sweep(*args):
    out = subprocess.run([sys.executable, "launch/sweep.py", *args], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    return out.stdout, out.stderr


def _finish(workdir):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump({"methods": {}}, f)


def test_sweep_dry_run_lists_jobs_and_skips_finished(tmp_path):
    root = str(tmp_path / "runs")
    _finish(os.path.join(root, "cifar_convnet_smoke", "imp", "seed1"))
    os.makedirs(os.path.join(root, "cifar_convnet_smoke", "random", "seed0"))  # unfinished
    stdout, stderr = _sweep("--configs", CONFIG, "configs/fashion_mnist.py:smoke",
                            "--methods", "imp", "random", "--seeds", "0-1", "--root", root,
                            "--override", "train.epochs=1", "--dry_run")
    cmds = [shlex.split(line) for line in stdout.splitlines() if not line.startswith("#")]
    assert len(cmds) == 2 * 2 * 2 - 1
    workdirs = [c[c.index("-m") + 2:][1].split("=", 1)[1] for c in cmds]
    assert os.path.join(root, "cifar_convnet_smoke", "imp", "seed1") not in workdirs
    assert "finished, skipped" in stderr and "1 finished" in stderr
    assert "# resume" in stdout  # the unfinished workdir is resumed, not restarted elsewhere
    first = cmds[0]
    assert first[1:3] == ["-m", "dp_jax.main"]
    assert f"--config={CONFIG}" in first and "--config.seed=0" in first
    assert "--config.prune.method=imp" in first and "--config.train.epochs=1" in first
    assert "--config.seeds=1" in first


def test_sweep_without_methods_uses_the_config_and_emits_a_job_file(tmp_path):
    root, jobs = str(tmp_path / "runs"), str(tmp_path / "jobs.jsonl")
    _finish(os.path.join(root, "cifar_convnet_smoke", "seed2"))
    stdout, _ = _sweep("--configs", CONFIG, "--seeds", "0,2,3", "--root", root, "--emit", jobs)
    assert stdout.strip() == "2"
    lines = [json.loads(line) for line in open(jobs)]
    assert [j["workdir"].rsplit("seed", 1)[1] for j in lines] == ["0", "3"]
    assert not any(a.startswith("--config.prune.method") for a in lines[0]["cmd"])
    # A job that finished after emission is skipped when its array task starts.
    _finish(lines[1]["workdir"])
    stdout, _ = _sweep("--job_file", jobs, "--job_index", "1")
    assert stdout.startswith("# finished, skipped")
    stdout, _ = _sweep("--job_file", jobs, "--job_index", "0", "--dry_run")
    assert "--config.seed=0" in stdout


@pytest.mark.slow
def test_sweep_runs_a_job_and_then_skips_it(tmp_path, toy_npz):
    root = str(tmp_path / "runs")
    args = ["--configs", "configs/fashion_mnist.py:smoke", "--methods", "imp", "--root", root,
            "--override", f"data.name=npz:{toy_npz}", "--override", "data.train_size=0",
            "--override", "train.batch_size=40", "--override", "prune.rounds=1",
            "--override", "train.epochs=1"]
    stdout, _ = _sweep(*args)
    assert "1 succeeded, 0 failed" in stdout
    assert os.path.exists(os.path.join(root, "fashion_mnist_smoke", "imp", "seed0", "summary.json"))
    stdout, _ = _sweep(*args)
    assert "0 succeeded, 0 failed, 1 already finished" in stdout


def _bash(script, *args, env=None):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(["bash", script, *args], cwd=ROOT, capture_output=True, text=True,
                          env=full_env, check=True).stdout


def test_slurm_dry_run_prints_the_array_and_its_tasks(tmp_path):
    root = str(tmp_path / "runs")
    _finish(os.path.join(root, "cifar_convnet_smoke", "seed1"))
    out = _bash("launch/slurm.sh", "--dry-run", "--", "--configs", CONFIG, "--seeds", "0-2",
                "--root", root, env={"PARTITION": "gpu", "TIME": "01:00:00"})
    sbatch = next(line for line in out.splitlines() if line.startswith("sbatch"))
    assert "--array=0-1%16" in sbatch and "--partition=gpu" in sbatch
    assert "--time=01:00:00" in sbatch and sbatch.endswith("launch/slurm.sh")
    tasks = [line for line in out.splitlines() if line[:2] in ("0:", "1:")]
    assert len(tasks) == 2 and "seed0" in tasks[0] and "seed2" in tasks[1]
    assert not os.path.exists(os.path.join(root, "slurm"))  # a dry run writes nothing
    # DRY_RUN=1 is the same as --dry-run; a sweep with nothing left submits nothing.
    for s in (0, 2):
        _finish(os.path.join(root, "cifar_convnet_smoke", f"seed{s}"))
    out = _bash("launch/slurm.sh", "--", "--configs", CONFIG, "--seeds", "0-2", "--root", root,
                env={"DRY_RUN": "1"})
    assert "nothing to run" in out


def test_slurm_array_task_runs_its_line(tmp_path):
    jobs = str(tmp_path / "jobs.jsonl")
    _sweep("--configs", CONFIG, "--seeds", "4,5", "--root", str(tmp_path / "r"), "--emit", jobs)
    out = _bash("launch/slurm.sh", env={"SLURM_ARRAY_TASK_ID": "1", "JOB_FILE": jobs,
                                        "DP_JAX_REPO": ROOT, "DRY_RUN": "1",
                                        "PYTHON": sys.executable})
    assert "--config.seed=5" in out.splitlines()[-1]


@pytest.mark.parametrize("accel,multihost", [("v4-8", "False"), ("v4-32", "True")])
def test_tpu_vm_dry_run_echoes_gcloud(accel, multihost):
    out = _bash("launch/tpu_vm.sh", "--dry-run", "all", "delete",
                env={"ACCELERATOR_TYPE": accel, "TPU_NAME": "t1", "ZONE": "z1",
                     "REPO_URL": "https://example.com/dp_jax.git", "CONFIG": CONFIG})
    lines = [shlex.split(line[2:]) for line in out.splitlines() if line.startswith("+ ")]
    assert [w[:4] for w in lines] == [["gcloud", "compute", "tpus", "tpu-vm"]] * 4
    create, setup, run, delete = lines
    assert create[4:6] == ["create", "t1"] and f"--accelerator-type={accel}" in create
    for cmd in (setup, run):
        assert cmd[4:6] == ["ssh", "t1"] and "--worker=all" in cmd and "--zone=z1" in cmd
    assert "pip install" in setup[-1] and "https://example.com/dp_jax.git" in setup[-1]
    assert "python3 -m dp_jax.main" in run[-1] and f"--config={CONFIG}" in run[-1]
    assert f"--config.parallel.multihost={multihost}" in run[-1]
    assert delete[4:6] == ["delete", "t1"]


def test_tpu_vm_rejects_unknown_actions():
    out = subprocess.run(["bash", "launch/tpu_vm.sh", "--dry-run", "explode"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 2 and "allowed" in out.stderr


def _estimate(*args):
    return subprocess.run([sys.executable, "launch/estimate.py", *args], cwd=ROOT,
                          capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_estimate_reports_peak_device_memory_and_refuses_what_does_not_fit():
    config = "configs/fashion_mnist.py:smoke"
    fits = _estimate(config, "--device_memory_gb", "1")
    assert fits.returncode == 0, fits.stderr[-2000:]
    mem = json.loads(fits.stdout)["memory"]
    # The compiled step's own figures, with the donated state counted once.
    assert mem["step_bytes"] == (mem["argument_bytes"] + mem["output_bytes"] + mem["temp_bytes"]
                                 - mem["alias_bytes"])
    assert mem["alias_bytes"] > 0 and mem["temp_bytes"] > 0  # the state is donated
    # LeNet-300-100: 266,610 float32 parameters; state = params + momentum (+ mask, step).
    assert mem["argument_bytes"] > 2 * 266_610 * 4
    # Fashion-MNIST smoke: 500 training and 10,000 test images of 28x28x1 stay on the device.
    assert mem["resident_data_bytes"] == (500 + 10_000) * (28 * 28 * 4 + 4)
    assert mem["peak_bytes"] == (mem["step_bytes"] + mem["resident_data_bytes"]
                                 + mem["held_weights_bytes"])
    assert 0 < mem["peak_gb"] < 1 and mem["backend"] == "cpu"
    refused = _estimate(config, "--device_memory_gb", "0.0001")
    assert refused.returncode == 2 and refused.stdout == ""
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1, refused.stderr
    assert f"needs {mem['peak_gb']:.4g} GB" in lines[0]
    assert "--device_memory_gb 0.0001 GB" in lines[0] and "refused" in lines[0]
