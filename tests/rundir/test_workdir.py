"""Run-directory trust: identity checks, additive extension, locking, workdir errors, paths."""

import json
import os

import numpy as np
import pytest

from dp_jax.tasks import prune as experiment
from dp_jax.storage import fileio
from dp_jax.rundir import lock as rundir_lock
from dp_jax.rundir import paths as workdir
from dp_jax.training.outputs import TrainingDivergedError

from conftest import assert_rejected, make_distilled

from dp_jax.pruning.records import TIMINGS  # noqa: E402


def _strip(rows):
    return sorted(({k: v for k, v in r.items() if k not in TIMINGS} for r in rows),
                  key=lambda r: (r["method"], r["seed"], r["round"]))


def _bytes(wd, rel):
    with open(os.path.join(wd, rel), "rb") as f:
        return f.read()


def test_changed_settings_are_refused_before_any_work(tiny_config, tmp_path):
    wd = str(tmp_path / "wd")
    tiny_config.prune.method = "imp"
    tiny_config.prune.rounds = 1
    experiment.run(tiny_config, wd)
    src = "npz:" + os.path.abspath(tiny_config.data.name[len("npz:"):])
    assert fileio.read_json(os.path.join(wd, "config.json"))["data_source"] == src
    assert fileio.read_json(os.path.join(wd, "summary.json"))["data_source"] == src
    # Each run records its identity; a run directory from other settings is refused.
    path = workdir.identity_path(wd, "imp_k0", 0)
    fields = fileio.read_json(path)
    assert fields["train.lr"] == tiny_config.train.lr and fields["run"] == "imp_k0"
    assert not any(k.startswith(("dp.", "distill.")) for k in fields)  # IMP reads neither
    fileio.write_json(path, dict(fields, **{"train.lr": 1.0}))  # as if copied from elsewhere
    with pytest.raises(ValueError, match=r"imp_k0-seed0 was made by other settings \(train.lr"):
        experiment.run(tiny_config, wd)
    before = {f: _bytes(wd, f) for f in ("config.json", "rounds.jsonl")}
    tiny_config.train.lr = 0.01
    tiny_config.train.momentum = 0.5
    tiny_config.prune.rounds = 2  # additive alone would be fine; the lr is not
    with pytest.raises(ValueError) as e:
        experiment.run(tiny_config, wd)
    msg = str(e.value)
    assert "train.lr: 0.05 -> 0.01" in msg and "train.momentum: 0.9 -> 0.5" in msg
    assert "prune.rounds" not in msg and "new --workdir" in msg
    assert {f: _bytes(wd, f) for f in before} == before  # config.json not rewritten


def test_rejected_config_does_not_touch_the_workdir(tiny_config, tmp_path):
    wd = str(tmp_path / "wd")
    tiny_config.prune.method = "imp"
    tiny_config.prune.rounds = 1
    experiment.run(tiny_config, wd)
    before = _bytes(wd, "config.json")
    tiny_config.train.batch_size = 10_000  # caught once the data size is known
    with pytest.raises(ValueError, match="train.batch_size"):
        experiment.run(tiny_config, wd)
    assert _bytes(wd, "config.json") == before


def test_more_rounds_seeds_methods_and_rewind_steps_extend_a_workdir(tiny_config, tmp_path):
    c = tiny_config
    c.prune.method = "imp"
    c.prune.rounds = 1
    wd = str(tmp_path / "wd")
    experiment.run(c, wd)
    first = _bytes(wd, "runs/imp_k0-seed0/masks/round_001.npz")
    c.prune.rounds = 2
    c.seeds = 2
    c.prune.method = "imp,imp:k=3,random"  # a new rewind step needs a dense snapshot at 3
    experiment.run(c, wd)
    assert _bytes(wd, "runs/imp_k0-seed0/masks/round_001.npz") == first
    fresh = str(tmp_path / "fresh")
    experiment.run(c, fresh)
    assert _strip(fileio.read_jsonl(os.path.join(wd, "rounds.jsonl"))) == \
        _strip(fileio.read_jsonl(os.path.join(fresh, "rounds.jsonl")))
    for label in ("imp_k0", "imp_k3", "random"):
        for seed in (0, 1):
            for rnd in range(3):
                rel = f"runs/{label}-seed{seed}/masks/round_{rnd:03d}.npz"
                a, b = np.load(os.path.join(wd, rel)), np.load(os.path.join(fresh, rel))
                assert all(np.array_equal(a[k], b[k]) for k in a.files), rel


def test_a_second_process_on_a_workdir_fails_fast(tiny_config, tmp_path):
    wd = tmp_path / "wd"
    wd.mkdir()
    with rundir_lock.Lock(str(wd)):  # another holder (a second open file: flock refuses it too)
        with pytest.raises(RuntimeError, match=f"in use by process {os.getpid()}"):
            experiment.run(tiny_config, str(wd))
    assert not (wd / "config.json").exists()


def test_a_stale_lock_is_taken_over_and_released(tmp_path):
    (tmp_path / ".lock").write_text(json.dumps({"pid": 2**22 + 12345,
                                                 "host": os.uname().nodename}))
    with rundir_lock.Lock(str(tmp_path)) as lock:
        held = json.loads((tmp_path / ".lock").read_text())
        assert held["pid"] == os.getpid() and lock.held
    assert not (tmp_path / ".lock").exists()


def test_workdir_that_is_a_file_is_a_clear_error(tiny_config, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        experiment.run(tiny_config, str(f))


def test_diverged_dp_inner_loop_is_an_error(tiny_config, tmp_path):
    c = tiny_config
    c.distill.path = make_distilled(c, str(tmp_path / "syn.npz"))
    c.prune.method = "dp"
    c.prune.rounds = 1
    c.dp.steps = 20
    c.dp.lr = 1e8
    with pytest.raises(TrainingDivergedError, match="inner loop diverged in round 1"):
        experiment.run(c, str(tmp_path / "wd"))


def test_paths_round_trip():
    assert workdir.parse_run_name(workdir.run_name("reinit_imp_k0", 12)) == ("reinit_imp_k0", 12)
    assert workdir.parse_run_name("notarun") is None
    assert workdir.mask_path("W", "dp", 3, 7) == os.path.join("W", "runs", "dp-seed3", "masks",
                                                              "round_007.npz")
    fields = workdir.identity_fields({"seeds": 3, "train": {"lr": 0.1, "loop": "scan"},
                                      "parallel": {"data_parallel": True}})
    assert fields == {"train.lr": 0.1}


def test_cli_user_error_is_one_line_and_exit_2(toy_npz, tmp_path):
    import subprocess
    import sys
    from conftest import ROOT
    cmd = [sys.executable, "-m", "dp_jax.main", "--config=configs/fashion_mnist.py:smoke",
           f"--workdir={tmp_path / 'wd'}", f"--config.data.name=npz:{toy_npz}",
           "--config.train.lr=-1"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: config.train.lr=-1.0 is invalid")
    assert "Traceback" not in out.stderr
    out = subprocess.run(cmd + ["--verbose"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "Traceback" in out.stderr
    assert not (tmp_path / "wd").exists()


@pytest.mark.parametrize("field,value,match", [
    ("train.lr", float("inf"), "train.lr=inf is invalid; allowed: a finite number"),
    ("train.weight_decay", float("nan"), "train.weight_decay=nan is invalid"),
    ("train.decay_factor", 0.0, "train.decay_factor"),
    ("train.decay_factor", 5.0, "train.decay_factor"),
    ("dp.decay_factor", -1.0, "dp.decay_factor"),
    ("distill.ipc", 1000, "distill.ipc=1000 is invalid; allowed: at most the"),
])
def test_more_bad_values_fail_before_any_work(tiny_config, tmp_path, field, value, match):
    tiny_config.prune.method = "imp,dp"
    assert_rejected(tiny_config, field, value, match, tmp_path / "wd")


@pytest.mark.parametrize("edit,match", [
    (lambda d: d.update(y_train=np.zeros_like(d["y_train"]), y_test=np.zeros_like(d["y_test"])),
     "at least 2 classes"),
    (lambda d: d.update(y_train=np.where(d["y_train"] == 9, 8, d["y_train"])),
     r"test labels \[9\] never occur in the training split"),
    (lambda d: d.update(x_train=d["x_train"].astype(np.float32), x_test=d["x_test"].astype(np.float32)),
     "float with values in"),
])
def test_dataset_semantics_are_checked(tiny_config, tmp_path, toy_npz, edit, match):
    with np.load(toy_npz) as z:
        d = {k: z[k] for k in z.files}
    edit(d)
    bad = tmp_path / "bad.npz"
    np.savez(bad, **d)
    tiny_config.data.name = f"npz:{bad}"
    tiny_config.prune.method = "imp"
    with pytest.raises(ValueError, match=match):
        experiment.run(tiny_config, str(tmp_path / "wd"))
    assert not (tmp_path / "wd").exists()


def test_cli_unknown_config_key_lists_the_valid_ones(tmp_path):
    import subprocess
    import sys
    from conftest import ROOT
    out = subprocess.run([sys.executable, "-m", "dp_jax.main",
                          "--config=configs/fashion_mnist.py:smoke", f"--workdir={tmp_path / 'w'}",
                          "--config.train.lrr=1"], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "--config.train.lrr: train has no field 'lrr'; valid: batch_size," in out.stderr


def _masks(wd, label):
    return {r: _bytes(wd, os.path.relpath(p, wd))
            for r, p in workdir.list_masks(wd, label, 0).items()}


def test_restart_changed_reruns_only_the_affected_runs(tiny_config, tmp_path):
    c = tiny_config
    c.prune.method = "imp,dp"
    c.prune.rounds = 1
    c.distill.path = make_distilled(c, str(tmp_path / "set.npz"))
    wd = str(tmp_path / "wd")
    experiment.run(c, wd)
    imp, dp = _masks(wd, "imp_k0"), _masks(wd, "dp")
    c.dp.lr = 0.2  # read by DP only
    with pytest.raises(ValueError, match=r"dp.lr: .* -> 0.2(.|\n)*--restart_changed"):
        experiment.run(c, wd)
    experiment.run(c, wd, restart_changed=True)
    assert _masks(wd, "imp_k0") == imp  # untouched
    (old,) = os.listdir(os.path.join(wd, workdir.SUPERSEDED))
    moved = os.path.join(wd, workdir.SUPERSEDED, old)
    assert sorted(os.listdir(os.path.join(moved, "runs"))) == ["dp-seed0"]
    assert _masks(moved, "dp") == dp
    fresh = str(tmp_path / "fresh")
    experiment.run(c, fresh)
    assert _masks(wd, "dp") == _masks(fresh, "dp") != dp
    assert _strip(fileio.read_jsonl(os.path.join(wd, "rounds.jsonl"))) == \
        _strip(fileio.read_jsonl(os.path.join(fresh, "rounds.jsonl")))
    # A field every run reads: everything moves and reruns, equal to a fresh workdir.
    c.train.lr = 0.01
    experiment.run(c, wd, restart_changed=True)
    fresh2 = str(tmp_path / "fresh2")
    experiment.run(c, fresh2)
    assert _masks(wd, "imp_k0") == _masks(fresh2, "imp_k0") != imp
    assert _strip(fileio.read_jsonl(os.path.join(wd, "rounds.jsonl"))) == \
        _strip(fileio.read_jsonl(os.path.join(fresh2, "rounds.jsonl")))
    # The metrics stream holds no rows of the superseded trainings.
    rows = [r for r in fileio.read_jsonl(os.path.join(wd, "metrics.jsonl")) if "run" in r]
    assert len(rows) == len([r for r in fileio.read_jsonl(os.path.join(fresh2, "metrics.jsonl"))
                             if "run" in r])


def test_a_full_disk_is_a_clear_error_and_leaves_no_partial_file(tmp_path, monkeypatch, capsys):
    import errno
    from dp_jax.cli import common as cli_common

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    target = tmp_path / "config.json"
    target.write_text("old")
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(fileio.NoSpaceError, match=r"no space left to write .*config.json"):
        fileio.write_json(str(target), {"a": 1})
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["config.json"]
    # A full disk under the checkpoint library (which wraps the OSError) reads the same.
    monkeypatch.undo()
    ckpt = fileio.RoundCheckpointer(str(tmp_path / "ck"))

    def wrapped(*a, **k):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise RuntimeError("async save failed") from e
    monkeypatch.setattr(ckpt._mgr, "save", wrapped)
    with pytest.raises(fileio.NoSpaceError, match=r"no space left to write .*ck/3"):
        ckpt.save(3, {"x": np.zeros(2)}, {})
    ckpt.close()
    # The command line prints it as one line and exits 2.
    run = cli_common.guarded(lambda argv: fileio.write_json(str(target), {}), verbose=lambda: False)
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(SystemExit) as e:
        run([])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no space left to write") and "\n" not in err


def test_supersede_moves_exactly_the_affected_files(tmp_path):
    wd = str(tmp_path)
    files = ["runs/imp_k0-seed0/rounds.jsonl", "runs/reinit_imp_k0-seed0/rounds.jsonl",
             "analysis/hessian_imp_k0-seed0-round001.json",
             "analysis/hessian_reinit_imp_k0-seed0-round001.json",
             "analysis/done_imp_k0-seed0-round001.json", "analysis/masks.json",
             "tb/imp_k0-seed0/round_001/events", "tb/reinit_imp_k0-seed0/round_001/events"]
    for f in files:
        os.makedirs(os.path.dirname(os.path.join(wd, f)), exist_ok=True)
        open(os.path.join(wd, f), "w").write(f)
    fileio.write_jsonl(os.path.join(wd, "metrics.jsonl"), [
        {"run": "imp_k0", "seed": 0, "loss": 1.0}, {"run": "reinit_imp_k0", "seed": 0, "loss": 2.0},
        {"phase": "distill", "iteration": 1, "loss": 3.0}])
    dest = workdir.supersede(wd, [("imp_k0", 0)], distill=False)
    moved = sorted(os.path.relpath(os.path.join(r, f), dest)
                   for r, _, fs in os.walk(dest) for f in fs)
    assert moved == sorted(["metrics.jsonl"] + [f for f in files if "reinit" not in f])
    assert all(os.path.exists(os.path.join(wd, f)) == ("reinit" in f) for f in files)
    assert [r.get("run") for r in fileio.read_jsonl(os.path.join(wd, "metrics.jsonl"))] == \
        ["reinit_imp_k0", None]
