"""After a resume, metrics.jsonl holds exactly the rows of an uninterrupted run (timings
aside), wherever the kill came: mid-epoch rows of a round being recomputed are replaced, not
repeated (dp_jax/rundir/metrics.py MetricsLog)."""

import os
import sys

import pytest

from conftest import ROOT, kill_then_resume, load_config_module
from dp_jax.pruning import rounds as prune_lib
from dp_jax.pruning.records import TIMINGS
from dp_jax.rundir import metrics as metrics_lib
from dp_jax.rundir import paths
from dp_jax.storage import fileio
from dp_jax.tasks import prune as experiment

DROP = set(TIMINGS) | {"wall_s"}


class Killed(BaseException):
    """Stands for a kill: no ``except Exception`` in the code under test catches it."""


def _config(npz):
    c = load_config_module("fashion_mnist").get_config("smoke")
    c.data.name = f"npz:{npz}"
    c.data.train_size = 0
    c.train.batch_size = 40
    c.train.epochs = 2
    c.train.eval_batch_size = 64
    c.metrics.tensorboard = False
    c.prune.method = "imp,random"
    c.prune.rounds = 2
    return c


def _rows(wd, name):
    return [{k: v for k, v in r.items() if k not in DROP}
            for r in fileio.read_jsonl(os.path.join(wd, name))]


@pytest.fixture(scope="module")
def reference(toy_npz, tmp_path_factory):
    """An uninterrupted run: 2 epochs each of dense, imp rounds 1-2 and random rounds 1-2."""
    wd = str(tmp_path_factory.mktemp("ref") / "wd")
    experiment.run(_config(toy_npz), wd, progress=False)
    rows = _rows(wd, "metrics.jsonl")
    assert [(r["run"], r["round"], r["epoch"]) for r in rows] == [
        (run, rnd, e) for run, rnd in (("dense", 0), ("imp_k0", 1), ("imp_k0", 2),
                                       ("random", 1), ("random", 2)) for e in (0, 1)]
    return wd


def _kill_after_row(monkeypatch, n):
    """The run is killed right after its ``n``-th metrics row is written."""
    real, count = metrics_lib.MetricsLog.__call__, []

    def call(self, **row):
        real(self, **row)
        count.append(1)
        if len(count) == n:
            raise Killed(f"killed after metrics row {n}")
    monkeypatch.setattr(metrics_lib.MetricsLog, "__call__", call)


def _kill_after_record(monkeypatch, label, rnd):
    """The run is killed right after round ``rnd`` of ``label`` was committed."""
    real = prune_lib.finish_round

    def finish(run, r, *a, **k):
        real(run, r, *a, **k)
        if run.spec.label == label and r == rnd:
            raise Killed(f"killed after {label} round {rnd}")
    monkeypatch.setattr(prune_lib, "finish_round", finish)


# Rows 1-2: dense epochs 0-1 (2: trained, not checkpointed); 3-4: imp round 1 (4: trained, no
# record yet); 7: mid random round 1; 10: random round 2 trained, before its record.
@pytest.mark.parametrize("kill", ["row1", "row2", "row3+torn", "row4", "row7", "row10",
                                  "record:imp_k0:1", "record:random:1"])
def test_metrics_after_a_resume_equal_an_uninterrupted_runs(reference, toy_npz, tmp_path,
                                                            monkeypatch, kill):
    wd = str(tmp_path / "wd")
    if kill.startswith("row"):
        _kill_after_row(monkeypatch, int(kill[3:].split("+")[0]))
    else:
        _, label, rnd = kill.split(":")
        _kill_after_record(monkeypatch, label, int(rnd))
    with pytest.raises(Killed):
        experiment.run(_config(toy_npz), wd, progress=False)
    monkeypatch.undo()
    if kill.endswith("+torn"):  # a kill mid-write leaves half a line
        with open(paths.metrics_path(wd), "a") as f:
            f.write('{"epoch": 1, "loss": 0.')
    experiment.run(_config(toy_npz), wd, progress=False)
    assert _rows(wd, "metrics.jsonl") == _rows(reference, "metrics.jsonl")
    assert sorted(map(str, _rows(wd, "rounds.jsonl"))) == \
        sorted(map(str, _rows(reference, "rounds.jsonl")))


def test_metrics_after_a_sigkill_equal_an_uninterrupted_runs(reference, toy_npz, tmp_path):
    """The command line, SIGKILLed once imp's round 1 is checkpointed (mid round 2)."""
    wd = tmp_path / "wd"
    cmd = [sys.executable, "-m", "dp_jax.main", "--config=configs/fashion_mnist.py:smoke",
           f"--workdir={wd}", f"--config.data.name=npz:{toy_npz}", "--config.data.train_size=0",
           "--config.train.batch_size=40", "--config.train.epochs=2",
           "--config.train.eval_batch_size=64", "--config.metrics.tensorboard=False",
           "--config.prune.method=imp,random", "--config.prune.rounds=2"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    kill_then_resume(cmd, str(wd), str(wd / "runs" / "imp_k0-seed0" / "checkpoints" / "1"),
                     env, timeout=300)
    assert _rows(str(wd), "metrics.jsonl") == _rows(reference, "metrics.jsonl")


def test_a_stream_restarting_mid_way_replaces_only_the_recomputed_rows(tmp_path):
    """The rule itself: a process's first row of a stream drops the earlier rows of that
    stream from its position on; other streams and earlier positions stay."""
    wd = str(tmp_path)
    fileio.write_jsonl(paths.metrics_path(wd), [
        {"phase": "distill", "iteration": 10, "loss": 1.0},
        {"phase": "distill", "iteration": 20, "loss": 2.0},
        {"phase": "distill", "iteration": 30, "loss": 3.0},
        {"phase": "distill_eval", "iteration": 20, "accuracy_mean": 0.5},
        {"phase": "experts", "expert": 0, "epoch": 1, "loss": 4.0},
        {"phase": "final_eval", "set": "distilled", "accuracy_mean": 0.6}])
    log = metrics_lib.MetricsLog(wd)
    log(phase="distill", iteration=20, loss=2.5)  # resumed from the checkpoint at 10
    log(phase="distill", iteration=30, loss=3.5)
    log(phase="final_eval", set="distilled", accuracy_mean=0.7)
    log.close()
    assert fileio.read_jsonl(paths.metrics_path(wd)) == [
        {"phase": "distill", "iteration": 10, "loss": 1.0},
        {"phase": "distill_eval", "iteration": 20, "accuracy_mean": 0.5},
        {"phase": "experts", "expert": 0, "epoch": 1, "loss": 4.0},
        {"phase": "distill", "iteration": 20, "loss": 2.5},
        {"phase": "distill", "iteration": 30, "loss": 3.5},
        {"phase": "final_eval", "set": "distilled", "accuracy_mean": 0.7}]
