"""Run identity, restart and locking rules of dp_jax/rundir/paths.py, on hand-written run
directories (config.json and runs/<run>/identity.json written here with plain json; no training).
The end-to-end tests of the same guarantees are in tests/rundir/test_workdir.py."""

import copy
import json
import os
import socket

import pytest

from dp_jax.config import defaults
from dp_jax.rundir import paths
from dp_jax.rundir import lock as rundir_lock


def _config(**edits):
    """The base config as a dict, with ``section__field=value`` edits."""
    c = defaults.base_config().to_dict()
    for key, value in edits.items():
        *sections, field = key.split("__")
        d = c
        for s in sections:
            d = d[s]
        d[field] = value
    return c


def _write(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def _old_workdir(tmp_path, config, drop=()):
    """A workdir holding a result (one round record), whose config.json (as a run writes it,
    with data_source) is ``config`` less the dotted fields in ``drop`` (as written before those
    fields existed)."""
    old = copy.deepcopy(config)
    old["data_source"] = "npz:/old/place/data.npz"
    for key in drop:
        section, field = key.split(".")
        del old[section][field]
    wd = str(tmp_path / "wd")
    _write(os.path.join(wd, "config.json"), old)
    _write(paths.run_rounds_path(wd, "imp_k0", 0), {"round": 0})
    return wd


def _read(path):
    with open(path) as f:
        return f.read()


# ---- which fields decide results -------------------------------------------------------------

def test_identity_fields_keep_only_result_deciding_fields():
    """Additive and no-effect fields are dropped (prefixes by section, others exactly); tuples become lists."""
    cfg = {"task": "prune", "seed": 3, "seeds": 5,
           "train": {"lr": 0.1, "loop": "scan", "unroll": 4, "eval_batch_size": 9, "decay_at": (0.5,),
                     "loop_x": 1},
           "prune": {"rounds": 2, "method": "imp", "rewind_step": 3, "plugins": "x", "fraction": 0.2},
           "distill": {"loop": "scan", "eval_batch_size": 7, "checkpoint_every": 10},
           "dp": {"loop": "python", "unroll": 2, "chunk": 8, "lr": 0.3},
           "metrics": {"tensorboard": True}, "parallel": {"vmap_seeds": True},
           "checkpoint": {"keep": "last"}, "data": {"label_cache": "c", "name": "x"}}
    assert paths.identity_fields(cfg) == {
        "seed": 3, "train.lr": 0.1, "train.decay_at": [0.5], "train.loop_x": 1, "prune.fraction": 0.2,
        "distill.loop": "scan", "distill.eval_batch_size": 7, "dp.lr": 0.3, "data.name": "x"}


def test_base_defaults_are_the_base_configs_fields():
    """The defaults of the added-field rule are defaults.base_config()'s result-deciding fields."""
    base = defaults.base_config()
    got = paths.base_defaults()
    assert got["train.lr"] == base.train.lr == 0.05 and got["dp.epochs"] == base.dp.epochs == 0
    assert got["train.decay_at"] == list(base.train.decay_at)
    assert "seeds" not in got and "train.loop" not in got
    assert got == paths.identity_fields(base.to_dict())


# ---- the workdir's config.json ---------------------------------------------------------------

def test_a_new_workdir_has_nothing_to_check(tmp_path):
    """Without config.json there is no difference, and nothing is written."""
    wd = str(tmp_path / "new")
    assert paths.identity_diff(wd, _config(train__lr=9.0)) == {}
    assert paths.check_identity(wd, _config(train__lr=9.0)) == {}
    assert not os.path.exists(wd)


def test_an_unchanged_config_passes(tmp_path):
    """The config that made a workdir resumes it (data_source in config.json is no setting)."""
    cfg = _config(train__lr=0.01, prune__method="imp,dp")
    wd = _old_workdir(tmp_path, cfg)
    assert paths.check_identity(wd, cfg) == {}
    assert paths.check_identity(wd, json.loads(json.dumps(cfg))) == {}  # tuples read back as lists


def test_a_changed_result_field_is_refused_naming_it_and_both_values(tmp_path):
    """Each changed result-deciding field is named with its old and new value; config.json is untouched."""
    wd = _old_workdir(tmp_path, _config())
    before = _read(paths.config_path(wd))
    new = _config(train__lr=0.01, data__preprocess="zca", prune__rounds=9)
    with pytest.raises(ValueError) as e:
        paths.check_identity(wd, new)
    msg = str(e.value)
    assert "  train.lr: 0.05 -> 0.01\n" in msg and "  data.preprocess: 'standard' -> 'zca'\n" in msg
    assert "prune.rounds" not in msg and "train.momentum" not in msg
    assert "new --workdir" in msg and "--restart_changed" in msg
    assert os.path.join(wd, "superseded") in msg
    assert _read(paths.config_path(wd)) == before


def test_fields_that_decide_no_result_are_ignored(tmp_path):
    """Changing only no-effect fields (loops, eval batch, sharding, cadence, task, data_source) passes."""
    wd = _old_workdir(tmp_path, _config())
    new = _config(task="distill", train__loop="python", train__unroll=8, train__eval_batch_size=7,
                  dp__loop="python", dp__unroll=4, dp__chunk=16, distill__checkpoint_every=5,
                  data__label_cache="/x", metrics__tensorboard=False, metrics__wandb=True,
                  parallel__data_parallel=True, parallel__vmap_seeds=True, checkpoint__keep="all")
    new["data_source"] = "npz:/new/place/data.npz"
    assert paths.check_identity(wd, new) == {}


def test_more_seeds_rounds_methods_and_rewind_steps_are_additive(tmp_path):
    """seeds, prune.rounds, prune.method, prune.rewind_step and prune.plugins extend a workdir."""
    wd = _old_workdir(tmp_path, _config(seeds=1, prune__rounds=2, prune__method="imp"))
    new = _config(seeds=3, prune__rounds=5, prune__method="imp,random,dp", prune__rewind_step=5,
                  prune__plugins="my.plugin")
    assert paths.check_identity(wd, new) == {}


def test_the_base_seed_is_not_additive(tmp_path):
    """A different first seed is a different experiment, unlike more seeds."""
    wd = _old_workdir(tmp_path, _config(seed=0))
    with pytest.raises(ValueError, match=r"  seed: 0 -> 1\n"):
        paths.check_identity(wd, _config(seed=1, seeds=4))


def test_a_field_added_later_takes_its_default(tmp_path):
    """A field absent from an old config.json counts as its base_config() default."""
    wd = _old_workdir(tmp_path, _config(), drop=("dp.epochs", "distill.method"))
    assert paths.check_identity(wd, _config()) == {}  # dp.epochs=0, distill.method='mtt'
    with pytest.raises(ValueError) as e:
        paths.check_identity(wd, _config(dp__epochs=5))
    assert "  dp.epochs: 0 -> 5\n" in str(e.value) and "distill.method" not in str(e.value)


def test_data_classes_kept_in_memory_by_an_earlier_version_is_a_change(tmp_path):
    """Before data.classes applied to in-memory data, a workdir with it set trained on every
    class: resuming it now would mix the two datasets, so it counts as a changed field. A
    stream-pipeline workdir, or one made by this version (with content hashes), is unchanged."""
    new = dict(_config(data__classes="0,1"), **{paths.CONTENT: {}})
    wd = _old_workdir(tmp_path, _config(data__classes="0,1"))
    with pytest.raises(ValueError, match=r"data.classes \(in memory\)"):
        paths.check_identity(wd, new)
    assert "data.classes (in memory)" in paths.check_identity(wd, new, restart=True)
    _write(os.path.join(wd, "config.json"), new)  # written by this version: nothing changed
    assert paths.check_identity(wd, new) == {}
    stream = _config(data__classes="0,1", data__pipeline="stream")
    wd2 = _old_workdir(tmp_path / "s", stream)
    assert paths.check_identity(wd2, dict(stream, **{paths.CONTENT: {}})) == {}


def test_a_field_absent_from_defaults_and_old_config_is_unset(tmp_path):
    """A field neither the old config nor the defaults know reads as '<unset>' and is refused."""
    wd = _old_workdir(tmp_path, _config())
    new = _config()
    new["train"]["novel_knob"] = 2
    assert paths.identity_diff(wd, new) == {"train.novel_knob": ("<unset>", 2)}


def test_a_workdir_without_results_is_not_bound_by_its_config(tmp_path):
    """A run that failed or was killed before its first checkpoint left config.json and
    identity files only: other settings get the differences back (to move the leftovers
    aside), as with restart; any result (a mask, a checkpoint file, a distilled set, an
    expert, an analysis) binds the workdir again."""
    wd = str(tmp_path / "wd")
    _write(paths.config_path(wd), _config())
    _write(paths.identity_path(wd, "imp_k0", 0), {"run": "imp_k0"})
    os.makedirs(os.path.join(paths.checkpoints_dir(wd, "imp_k0", 0), "0"))  # an empty directory
    _write(paths.metrics_path(wd), {"epoch": 0})
    assert not paths.holds_results(wd)
    assert paths.check_identity(wd, _config(train__lr=0.01)) == {"train.lr": (0.05, 0.01)}
    for result in ("runs/imp_k0-seed0/masks/round_000.npz",
                   "runs/dense-seed0/checkpoints/0/arrays/x", "distilled.npz",
                   "experts/expert_000/epoch_000.npz", "checkpoints/distill/5/x",
                   "analysis/done_imp_k0-seed0-round000.json", "rounds.jsonl"):
        _write(os.path.join(wd, result), {})
        assert paths.holds_results(wd), result
        with pytest.raises(ValueError, match="holds results of other settings"):
            paths.check_identity(wd, _config(train__lr=0.01))
        os.remove(os.path.join(wd, result))


def test_restart_returns_the_changed_fields_instead_of_raising(tmp_path):
    """restart=True returns {field: (old, new)} of the changed result-deciding fields only."""
    wd = _old_workdir(tmp_path, _config(), drop=("dp.cutmix_prob",))
    new = _config(dp__lr=0.2, train__momentum=0.5, prune__rounds=7, dp__cutmix_prob=0.5)
    assert paths.check_identity(wd, new, restart=True) == {
        "dp.lr": (0.0, 0.2), "train.momentum": (0.9, 0.5), "dp.cutmix_prob": (0.0, 0.5)}
    assert paths.check_identity(wd, _config(), restart=True) == {}


# ---- per-run identity ------------------------------------------------------------------------

def test_run_fields_leave_out_the_small_set_sections_for_runs_that_do_not_read_them():
    """dp.* and distill.* only for small-set runs; the base seed is replaced by the run's."""
    cfg = _config(seed=4, dp__lr=0.2)
    imp = paths.run_fields(cfg, "imp_k0", 6, small_set=False)
    dp = paths.run_fields(cfg, "dp", 6, small_set=True)
    assert imp["run"] == "imp_k0" and imp["seed"] == 6 and imp["train.lr"] == 0.05
    assert not any(k.startswith(("dp.", "distill.")) for k in imp)
    assert dp["dp.lr"] == 0.2 and dp["distill.method"] == "mtt" and dp["seed"] == 6
    assert set(dp) - set(imp) == {k for k in paths.identity_fields(cfg)
                                  if k.startswith(("dp.", "distill."))}


def test_a_new_run_directory_records_its_identity(tmp_path):
    """check_run_identity writes runs/<run>/identity.json when there is none."""
    wd = str(tmp_path)
    fields = {"train.lr": 0.05, "run": "imp_k0", "seed": 2}
    paths.check_run_identity(wd, "imp_k0", 2, fields)
    assert paths.identity_path(wd, "imp_k0", 2) == os.path.join(wd, "runs", "imp_k0-seed2",
                                                                "identity.json")
    with open(paths.identity_path(wd, "imp_k0", 2)) as f:  # marked: every file is checksummed
        assert json.load(f) == dict(fields, **{paths.CHECKSUMS: 1})
    paths.check_run_identity(wd, "imp_k0", 2, dict(fields))  # the same fields again: accepted


def test_a_run_directory_from_other_settings_is_refused(tmp_path):
    """A differing identity.json is refused naming the run and each field; the file is kept."""
    wd = str(tmp_path)
    old = {"train.lr": 1.0, "model.name": "conv", "run": "imp_k0", "seed": 0}
    _write(paths.identity_path(wd, "imp_k0", 0), old)
    # data.zca_eps is absent from the old file: it takes its default (0.1), here changed.
    new = {"train.lr": 0.05, "model.name": "conv", "run": "imp_k0", "seed": 0, "data.zca_eps": 0.5}
    with pytest.raises(ValueError) as e:
        paths.check_run_identity(wd, "imp_k0", 0, new)
    assert str(e.value) == (
        f"{os.path.join(wd, 'runs', 'imp_k0-seed0')} was made by other settings "
        "(data.zca_eps: 0.1 -> 0.5; train.lr: 1.0 -> 0.05); use a new --workdir or --restart_changed")
    with open(paths.identity_path(wd, "imp_k0", 0)) as f:
        assert json.load(f) == old


def test_a_run_identity_older_than_a_field_resumes(tmp_path):
    """A run's identity.json lacking a field added later is accepted when the field is at its default."""
    wd = _old_workdir(tmp_path, _config(), drop=("train.nesterov",))
    fields = paths.run_fields(_config(), "imp_k0", 0, small_set=False)
    _write(paths.identity_path(wd, "imp_k0", 0),
           {k: v for k, v in fields.items() if k != "train.nesterov"})
    assert paths.check_identity(wd, _config()) == {}
    paths.check_run_identity(wd, "imp_k0", 0, fields)


# ---- supersede -------------------------------------------------------------------------------

def _tree(root):
    return sorted(os.path.relpath(os.path.join(r, f), root) for r, _, fs in os.walk(root) for f in fs)


def test_supersede_moves_the_named_runs_and_the_distilled_set_and_deletes_nothing(tmp_path):
    """Named runs, their tb and analysis, summaries and the distilled set move; the rest stays."""
    wd = str(tmp_path / "wd")
    keep = ["runs/imp_k0-seed0/identity.json", "runs/dp-seed1/identity.json",
            "runs/dense-seed0/identity.json", "tb/imp_k0-seed0/events",
            "analysis/hessian_imp_k0-seed0-round001.json", "analysis/hessian_dp-seed1-round001.json",
            "rounds.jsonl"]
    move = ["runs/dp-seed0/identity.json", "runs/dp-seed0/masks/round_001.npz", "tb/dp-seed0/ev",
            "analysis/hessian_dp-seed0-round001.json", "analysis/masks.json", "distilled.npz",
            "distilled.png", "checkpoints/distill/5/x", "experts/e0.npz", "tb/distill/ev",
            "tb/experts/ev"]
    for f in keep + move:
        _write(os.path.join(wd, f), f)
    _write(paths.config_path(wd), {"seed": 0})
    rows = [{"run": "dp", "seed": 0, "loss": 1}, {"run": "dp", "seed": 1, "loss": 2},
            {"phase": "distill", "iteration": 1}, {"phase": "experts", "epoch": 0},
            {"run": "imp_k0", "seed": 0, "loss": 3}]
    with open(paths.metrics_path(wd), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    dest = paths.supersede(wd, [("dp", 0)], distill=True)
    assert os.path.dirname(dest) == os.path.join(wd, "superseded")
    assert _tree(dest) == sorted(move + ["config.json", "metrics.jsonl"])
    assert all(_read(os.path.join(dest, f)) == json.dumps(f) for f in move)
    assert all(_read(os.path.join(wd, f)) == json.dumps(f) for f in keep)
    assert not any(os.path.exists(os.path.join(wd, f)) for f in move)
    # config.json and the full metrics.jsonl are copied; the workdir's keeps the staying runs' rows.
    assert json.loads(_read(paths.config_path(wd))) == {"seed": 0}
    assert [json.loads(r) for r in _read(os.path.join(dest, "metrics.jsonl")).splitlines()] == rows
    assert [json.loads(r) for r in _read(paths.metrics_path(wd)).splitlines()] == [rows[1], rows[4]]


def test_supersede_without_distill_leaves_the_distilled_set(tmp_path):
    """distill=False moves no distillation output, and no run when none is named."""
    wd = str(tmp_path)
    for f in ("distilled.npz", "experts/e0.npz", "runs/dp-seed0/identity.json"):
        _write(os.path.join(wd, f), f)
    dest = paths.supersede(wd, [], distill=False)
    assert _tree(dest) == []
    assert _tree(wd) == ["distilled.npz", "experts/e0.npz", "runs/dp-seed0/identity.json"]


# ---- the workdir itself: writable, locked ----------------------------------------------------

def test_check_writable(tmp_path):
    """A file is refused as a workdir; a not yet existing path in a writable directory passes."""
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match=r"--workdir=.*f is a file, not a directory"):
        paths.check_writable(str(tmp_path / "f"))
    paths.check_writable(str(tmp_path / "a" / "b"))
    assert not (tmp_path / "a").exists()


def test_a_second_lock_holder_is_refused(tmp_path):
    """While a Lock is held a second one fails naming the holder; leaving releases it."""
    wd = str(tmp_path)
    with rundir_lock.Lock(wd):
        with pytest.raises(RuntimeError, match=rf"in use by process {os.getpid()} on "
                           rf"{socket.gethostname()}"):
            rundir_lock.Lock(wd).__enter__()
        assert json.loads(_read(rundir_lock.lock_path(wd)))["pid"] == os.getpid()  # still the holder's
    assert not os.path.exists(rundir_lock.lock_path(wd))
    with rundir_lock.Lock(wd) as again:
        assert again.held


def _dead_pid():
    import subprocess
    import sys
    p = subprocess.Popen([sys.executable, "-c", ""])
    p.wait()
    return p.pid


def test_a_dead_processs_lock_is_taken_over_only_on_its_own_host(tmp_path):
    """A lock of a gone process on this host is replaced; on another host it is refused."""
    wd = str(tmp_path)
    pid = _dead_pid()
    _write(rundir_lock.lock_path(wd), {"pid": pid, "host": "elsewhere.invalid"})
    with pytest.raises(RuntimeError, match=rf"in use by process {pid} on elsewhere.invalid"):
        rundir_lock.Lock(wd).__enter__()
    _write(rundir_lock.lock_path(wd), {"pid": pid, "host": socket.gethostname()})
    with rundir_lock.Lock(wd) as lock:
        assert lock.held and json.loads(_read(rundir_lock.lock_path(wd))) == {
            "pid": os.getpid(), "host": socket.gethostname()}
        with pytest.raises(RuntimeError, match="in use by process"):
            rundir_lock.Lock(wd).__enter__()
    assert not os.path.exists(rundir_lock.lock_path(wd))


def test_an_empty_or_garbage_lock_file_is_taken_over(tmp_path):
    """A lock file without a readable holder (empty, garbage, no usable pid) does not block
    the workdir (a pid of 0 or -1 must not be taken for a live process: signalling it would
    reach a whole process group). The race for such files: tests/rundir/test_lock_race.py."""
    wd = str(tmp_path)
    for content in ("", "not json", "[1, 2]", "\x00\xff", '{"pid": "x", "host": "h"}',
                    json.dumps({"pid": -1, "host": socket.gethostname()}),
                    json.dumps({"pid": 0, "host": socket.gethostname()}),
                    json.dumps({"host": socket.gethostname()})):
        with open(rundir_lock.lock_path(wd), "w") as f:
            f.write(content)
        with rundir_lock.Lock(wd) as lock:
            assert lock.held
        assert not os.path.exists(rundir_lock.lock_path(wd))
