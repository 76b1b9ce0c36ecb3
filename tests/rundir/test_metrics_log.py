"""Metrics a researcher can browse: TensorBoard event files mirror metrics.jsonl; plots."""

import os

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dp_jax.tasks import prune as experiment
from dp_jax.storage import fileio
from dp_jax.rundir import metrics as metrics_log, paths as workdir

from conftest import assert_rejected


def _scalars(run_dir, tag):
    acc = EventAccumulator(run_dir)
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_event_files_hold_every_epoch_of_every_round(tiny_config, tmp_path):
    c = tiny_config
    c.prune.method = "imp"
    c.prune.rounds = 2
    wd = str(tmp_path / "wd")
    experiment.run(c, wd)
    rows = fileio.read_jsonl(workdir.metrics_path(wd))
    for run, rnd in (("dense", 0), ("imp_k0", 1), ("imp_k0", 2)):
        want = [(r["epoch"], r["loss"]) for r in rows
                if r.get("run") == run and r.get("round") == rnd]
        assert len(want) == c.train.epochs
        got = _scalars(os.path.join(wd, "tb", f"{run}-seed0", f"round_{rnd:03d}"), "loss")
        assert [s for s, _ in got] == [s for s, _ in want]
        np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-6)
    # The report shows the training curves.
    report = open(workdir.report_path(wd)).read()
    assert "![training curves](plots/training_curves.png)" in report
    assert os.path.getsize(workdir.plot_path(wd, "training_curves.png")) > 1000


def test_tensorboard_off_writes_no_event_files(tiny_config, tmp_path):
    c = tiny_config
    c.prune.method = "random"
    c.prune.rounds = 1
    c.metrics.tensorboard = False
    wd = str(tmp_path / "wd")
    experiment.run(c, wd)
    assert not os.path.exists(os.path.join(wd, "tb"))
    assert fileio.read_jsonl(workdir.metrics_path(wd))  # the record is written regardless


def test_rows_map_to_tensorboard_runs_and_steps():
    assert metrics_log.tb_run({"run": "dp", "seed": 2, "round": 3, "epoch": 4}) == \
        (os.path.join("dp-seed2", "round_003"), 4)
    assert metrics_log.tb_run({"phase": "distill", "iteration": 10, "loss": 1.0}) == \
        ("distill", 10)
    assert metrics_log.tb_run({"phase": "experts", "expert": 1, "epoch": 5}) == \
        (os.path.join("experts", "expert_001"), 5)
    assert metrics_log.tb_run({"phase": "final_eval", "set": "random"}) is None
    assert metrics_log.scalars({"phase": "distill_eval", "iteration": 3, "accuracy_mean": 0.5,
                                "masked": True}) == {"eval/accuracy_mean": 0.5}


def test_distillation_events_and_loss_plot(tmp_path):
    from dp_jax.reports import curves
    log = metrics_log.MetricsLog(str(tmp_path), metrics_log.MetricsSettings.from_config(
        tensorboard=True))
    losses = [3.0, 2.0, 1.5]
    for i, v in enumerate(losses, 1):
        log(phase="distill", iteration=10 * i, loss=v, lr=0.01)
    log(phase="distill_eval", iteration=30, accuracy_mean=0.7)
    log.close()
    got = _scalars(str(tmp_path / "tb" / "distill"), "loss")
    assert got == [(10, 3.0), (20, 2.0), (30, 1.5)]
    assert _scalars(str(tmp_path / "tb" / "distill"), "eval/accuracy_mean") == \
        [(30, pytest.approx(0.7))]
    rows = fileio.read_jsonl(workdir.metrics_path(str(tmp_path)))
    assert curves.plot_distillation(rows, str(tmp_path / "d.png"))
    assert not curves.plot_distillation([r for r in rows if r["phase"] != "distill"],
                                        str(tmp_path / "none.png"))
    assert not os.path.exists(tmp_path / "none.png")


def test_curves_take_the_last_row_of_a_recomputed_epoch():
    from dp_jax.reports import curves
    rows = [{"run": "imp_k0", "seed": 0, "round": 1, "epoch": e, "loss": v}
            for e, v in ((0, 9.0), (1, 8.0), (0, 2.0), (1, 1.0))]  # resumed: logged twice
    rows += [{"run": "imp_k0", "seed": 1, "round": 1, "epoch": e, "loss": v}
             for e, v in ((0, 4.0), (1, 3.0))]
    np.testing.assert_allclose(curves.epoch_curves(rows)["imp_k0"][1], [3.0, 2.0])


def test_an_empty_wandb_project_is_rejected(tiny_config, tmp_path):
    assert_rejected(tiny_config, "metrics.wandb_project", "", "non-empty", str(tmp_path / "wd"))


def test_wandb_without_the_package_is_refused_before_any_work(tiny_config, tmp_path,
                                                              monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    assert_rejected(tiny_config, "metrics.wandb", True, "wandb package", str(tmp_path / "wd"))
