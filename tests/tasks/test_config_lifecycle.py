"""config.json's life cycle: a start that left no result binds nothing; a rerun naming fewer
methods (or other additive values) keeps every run the workdir holds reachable; a plugin cannot
take a registered method's name (dp_jax/tasks/prune.py recorded_config,
dp_jax/rundir/paths.py holds_results, dp_jax/methods/registry.py register)."""

import os
import textwrap

import pytest

from dp_jax import methods
from dp_jax.pruning.records import TIMINGS
from dp_jax.rundir import metrics as metrics_lib
from dp_jax.rundir import paths
from dp_jax.storage import fileio
from dp_jax.tasks import prune as experiment
from dp_jax.tasks import settings as settings_lib
from dp_jax.training.outputs import TrainingDivergedError


class Killed(BaseException):
    """Stands for a kill: no ``except Exception`` in the code under test catches it."""


def _rows(wd, name):
    return [{k: v for k, v in r.items() if k not in TIMINGS}
            for r in fileio.read_jsonl(os.path.join(wd, name))]


def _labels(wd):
    return [s.label for s in settings_lib.from_workdir(wd)[0].specs]


@pytest.fixture
def small(tiny_config):
    tiny_config.prune.method = "imp"
    tiny_config.prune.rounds = 1
    return tiny_config


def test_a_start_that_failed_before_any_result_does_not_bind_the_workdir(small, tmp_path):
    """The dense training diverges: config.json and identity files exist but no result, so
    the corrected command runs (the leftovers move to superseded/) and equals a fresh run."""
    c, wd = small, str(tmp_path / "wd")
    c.train.lr = 1e9
    with pytest.raises(TrainingDivergedError):
        experiment.run(c, wd)
    assert os.path.exists(paths.config_path(wd)) and not paths.holds_results(wd)
    c.train.lr = 0.05
    experiment.run(c, wd)
    (moved,) = os.listdir(os.path.join(wd, paths.SUPERSEDED))
    assert fileio.read_json(os.path.join(wd, paths.SUPERSEDED, moved, "config.json"))[
        "train"]["lr"] == 1e9
    fresh = str(tmp_path / "fresh")
    experiment.run(c, fresh)
    for name in ("rounds.jsonl", "metrics.jsonl"):
        assert _rows(wd, name) == _rows(fresh, name), name


def test_a_run_killed_before_its_first_checkpoint_does_not_bind_the_workdir(small, tmp_path,
                                                                            monkeypatch):
    """Killed mid dense training (a metrics row written, no checkpoint): other settings run,
    and metrics.jsonl keeps no row of the killed settings."""
    c, wd = small, str(tmp_path / "wd")
    real = metrics_lib.MetricsLog.__call__

    def once(self, **row):
        real(self, **row)
        raise Killed()
    monkeypatch.setattr(metrics_lib.MetricsLog, "__call__", once)
    with pytest.raises(Killed):
        experiment.run(c, wd)
    monkeypatch.undo()
    assert len(fileio.read_jsonl(paths.metrics_path(wd))) == 1
    c.train.momentum = 0.5
    experiment.run(c, wd)
    fresh = str(tmp_path / "fresh")
    experiment.run(c, fresh)
    assert _rows(wd, "metrics.jsonl") == _rows(fresh, "metrics.jsonl")


def test_a_workdir_with_results_still_refuses_other_settings(small, tmp_path):
    c, wd = small, str(tmp_path / "wd")
    experiment.run(c, wd)
    c.train.momentum = 0.5
    with pytest.raises(ValueError, match="holds results of other settings"):
        experiment.run(c, wd)


def test_fewer_methods_seeds_or_rounds_keep_every_run_reachable(small, tmp_path):
    """config.json records the union of the methods with a run directory (order kept), the
    most seeds and rounds, while each rerun runs only what it names."""
    c, wd = small, str(tmp_path / "wd")
    c.prune.method = "imp,random"
    c.seeds = 2
    experiment.run(c, wd)
    c.prune.method = "random"
    c.seeds = 1
    experiment.run(c, wd)
    config = fileio.read_json(paths.config_path(wd))
    assert config["prune"]["method"] == "imp,random" and config["seeds"] == 2
    assert _labels(wd) == ["imp_k0", "random"]
    # A changed rewind step (additive) would rename "imp": the old entry is written in full.
    c.prune.method = "imp"
    c.prune.rewind_step = 3
    c.prune.rounds = 2
    experiment.run(c, wd)
    config = fileio.read_json(paths.config_path(wd))
    assert config["prune"]["method"] == "imp:k=0,random,imp"
    assert config["prune"]["rounds"] == 2 and config["prune"]["rewind_step"] == 3
    assert _labels(wd) == ["imp_k0", "random", "imp_k3"]
    assert {label for label, _ in paths.list_runs(wd)} == {"dense", "imp_k0", "random", "imp_k3"}
    # Rounds of the runs this rerun did not name stay as they were (1 round).
    assert len(fileio.read_jsonl(paths.run_rounds_path(wd, "random", 1))) == 2
    c.prune.rounds = 1  # fewer rounds again: the recorded count stays the largest
    experiment.run(c, wd)
    assert fileio.read_json(paths.config_path(wd))["prune"]["rounds"] == 2


def test_method_entry_writes_every_option():
    cfg = settings_lib.build({"prune": {"rewind_step": 4}})
    specs = methods.parse("imp,snip:oneshot,reinit:of=imp_k4,random,synflow", cfg, check=False)
    entries = [experiment.method_entry(s) for s in specs]
    assert entries[:3] == ["imp:k=4", "snip:oneshot", "reinit:of=imp_k4"]
    assert "k=0" in entries[3].split(":")[1].split(";") and entries[4] == "synflow:iters=100"
    other = settings_lib.build({"prune": {"rewind_step": 0}})
    assert [s.label for s in methods.parse(",".join(entries), other, check=False)] == \
        [s.label for s in specs]


def test_a_plugin_taking_a_built_in_methods_name_is_refused_in_one_line(small, tmp_path,
                                                                       monkeypatch):
    """Rerunning a workdir with a plugin that registers its own ``imp`` fails before any work,
    in one line naming the module and the name; the built-in stays."""
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "imp_again.py").write_text(textwrap.dedent("""
        from dp_jax import methods
        from dp_jax.methods import base

        class Imp(base.Method):
            name, title = "imp", "Not IMP"

        methods.register(Imp())
    """))
    monkeypatch.syspath_prepend(str(tmp_path / "plugins"))
    c, wd = small, str(tmp_path / "wd")
    experiment.run(c, wd)
    before = open(paths.config_path(wd)).read()
    builtin = methods.get("imp")
    c.prune.plugins = "imp_again"
    with pytest.raises(ValueError) as e:
        experiment.run(c, wd)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("config.prune.plugins: cannot import 'imp_again'")
    assert "a method named 'imp' is already registered" in msg
    assert methods.get("imp") is builtin
    assert open(paths.config_path(wd)).read() == before
