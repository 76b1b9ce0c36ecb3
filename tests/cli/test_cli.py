"""The ``dp-jax`` command line: subcommands, tickets, eval-mask, merged reports, std convention.

One two-seed workdir is made by ``dp-jax run`` (the smoke config, by its packaged name, on the
generated toy dataset); the other tests read it. Subcommands run as ``python -m dp_jax.cli``,
which is what the ``dp-jax`` console script calls.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from dp_jax import rng
from dp_jax.cli import main as cli
from dp_jax.cli import common as cli_common
from dp_jax.tasks import eval_mask, export
from dp_jax.tasks import settings as settings_lib
from dp_jax.storage import fileio, integrity
from dp_jax.reports import pruning as report
from dp_jax.pruning import rounds as prune_lib
from dp_jax.rundir import paths as workdir_lib
from dp_jax.config import files as config_files

from conftest import ROOT

ENV = dict(os.environ, JAX_PLATFORMS="cpu")


def _smoke(toy_npz):
    return ["--config=fashion_mnist:smoke", f"--config.data.name=npz:{toy_npz}",
            "--config.data.train_size=0", "--config.train.batch_size=40"]


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "dp_jax.cli", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def _one_line_error(out, *needles):
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def wd(toy_npz, tmp_path_factory):
    """A finished two-seed workdir (imp_k0, imp_k5, random; rounds 0..2), made by ``dp-jax run``."""
    d = str(tmp_path_factory.mktemp("cli") / "wd2")
    out = _cli("run", *_smoke(toy_npz), "--config.seeds=2", f"--workdir={d}")
    assert out.returncode == 0, out.stderr[-3000:]
    # The final figures are printed with the sample std and the number of seeds.
    assert "± " in out.stdout and "(n=2)" in out.stdout, out.stdout
    return d


def _record(wd, label, seed, rnd):
    rows = fileio.read_jsonl(workdir_lib.run_rounds_path(wd, label, seed))
    return next(r for r in rows if r["round"] == rnd)


# ---- dispatch, --config names, packaging ----------------------------------------------------

def test_dispatch_and_usage_errors():
    out = _cli("bogus")
    _one_line_error(out, "unknown command 'bogus'", "eval-mask")
    out = _cli()
    assert out.returncode == 2 and "commands:" in out.stdout


def test_config_names_resolve_to_packaged_files():
    path = config_files.resolve_config("fashion_mnist:smoke")
    assert path == os.path.join(config_files.configs_dir(), "fashion_mnist.py") + ":smoke"
    own = os.path.join(ROOT, "configs", "fashion_mnist.py") + ":conv"
    assert config_files.resolve_config(own) == own  # an existing path is taken as it is
    with pytest.raises(FileNotFoundError, match="packaged: .*fashion_mnist"):
        config_files.resolve_config("nope")
    assert "_paper" not in config_files.packaged_configs()
    argv = cli_common.resolve_config_argv(["x", "--config", "fashion_mnist", "--config.seed=1"])
    assert argv[2].endswith("fashion_mnist.py") and argv[3] == "--config.seed=1"


def test_pyproject_lists_every_package():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    listed = set(project["tool"]["setuptools"]["packages"])
    found = {os.path.relpath(d, ROOT).replace(os.sep, ".")
             for d, _, files in os.walk(os.path.join(ROOT, "dp_jax")) if "__init__.py" in files}
    assert found <= listed, f"add {sorted(found - listed)} to pyproject.toml's packages"
    assert project["tool"]["setuptools"]["package-dir"]["dp_jax_configs"] == "configs"
    assert project["project"]["scripts"]["dp-jax"] == "dp_jax.cli.main:main"


# ---- export ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def wd_setup(wd):
    """The workdir's experiment setup (compiled once for these tests)."""
    return export.rebuild_setup(settings_lib.from_workdir(wd)[0])


def _retrain(setup, ticket):
    step = ticket["meta"]["start"]["step"]
    state, ev, _, _ = prune_lib.train_and_eval(
        setup, ticket["init"], ticket["mask"], rng.key_for(ticket["meta"]["seed"], rng.DATA),
        start_step=step)
    return {"params": state.params, "batch_stats": state.batch_stats}, ev


def _same(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


def test_export_roundtrip_reproduces_record_and_training(wd, wd_setup, tmp_path):
    out = str(tmp_path / "ticket.npz")
    res = _cli("export", f"--workdir={wd}", "--run=imp_k0", "--seed=1", "--round=2",
               f"--out={out}")
    assert res.returncode == 0, res.stderr[-3000:]
    t = export.load_ticket(out)
    rec = _record(wd, "imp_k0", 1, 2)
    assert t["record"] == rec and t["meta"]["trained_source"] == "checkpoint"
    assert t["config"]["seeds"] == 2 and t["meta"]["start"] == {"kind": "init", "step": 0,
                                                                 "seed": 1}
    ev = wd_setup.trainer.evaluate(t["trained"]["params"], t["trained"]["batch_stats"],
                                   t["mask"], wd_setup.x_test, wd_setup.y_test)
    assert ev["accuracy"] == rec["test_accuracy"] and ev["loss"] == rec["test_loss"]
    trained, ev = _retrain(wd_setup, t)
    assert _same(trained, t["trained"]) and ev["accuracy"] == rec["test_accuracy"]


@pytest.mark.parametrize("rnd", [0, 1])
def test_export_of_a_rewound_run_retrains_from_its_start(wd, wd_setup, tmp_path, rnd):
    a, b = str(tmp_path / "ckpt.npz"), str(tmp_path / "retrained.npz")
    export.export_ticket(wd, "imp_k5", 0, rnd, a, source="checkpoint", setup=wd_setup)
    meta = export.export_ticket(wd, "imp_k5", 0, rnd, b, source="retrain", setup=wd_setup)
    ta, tb = export.load_ticket(a), export.load_ticket(b)
    assert tb["meta"]["trained_source"] == "retrained" and meta["check"]["matches_record"]
    # Round 0 is the dense network trained from init; later rounds rewind to step 5.
    assert tb["meta"]["start"]["step"] == (0 if rnd == 0 else 5)
    assert _same(ta["trained"], tb["trained"]) and _same(ta["init"], tb["init"])
    assert _same(_retrain(wd_setup, tb)[0], tb["trained"])


def test_load_ticket_refuses_damaged_and_foreign_files(wd, wd_setup, tmp_path):
    good = str(tmp_path / "t.npz")
    export.export_ticket(wd, "random", 0, 1, good, setup=wd_setup)
    data = open(good, "rb").read()
    bad = tmp_path / "truncated.npz"
    bad.write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match="truncated.npz"):
        export.load_ticket(str(bad))
    with pytest.raises(ValueError, match="not an exported ticket"):
        export.load_ticket(workdir_lib.mask_path(wd, "random", 0, 1))
    with np.load(good) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays["__meta__"]))
    np.savez(tmp_path / "v2.npz", **dict(arrays, __meta__=np.array(json.dumps(
        dict(meta, version=2)))))
    with pytest.raises(ValueError, match="v2.npz.*version 2"):
        export.load_ticket(str(tmp_path / "v2.npz"))
    del arrays["trained/params/fc1/kernel"]
    np.savez(tmp_path / "partial.npz", **arrays)
    with pytest.raises(ValueError, match="partial.npz.*missing"):
        export.load_ticket(str(tmp_path / "partial.npz"))


def test_export_names_what_does_not_exist(wd, tmp_path):
    out = str(tmp_path / "x.npz")
    for kw, msg in ((dict(label="imp_k0", seed=0, rnd=9),
                     r"--round=9.*finished rounds: \[0, 1, 2\]"),
                    (dict(label="snip", seed=0, rnd=1), "--run=snip is not a run"),
                    (dict(label="random", seed=7, rnd=1), r"--seed=7.*seeds: \[0, 1\]"),
                    (dict(label="dense", seed=0, rnd=0), "export round 0 of a method")):
        with pytest.raises(ValueError, match=msg):  # before any setup is built
            export.export_ticket(wd, kw["label"], kw["seed"], kw["rnd"], out)
    assert not os.path.exists(out)


# ---- eval-mask -------------------------------------------------------------------------------

def test_eval_mask_reproduces_the_recorded_accuracy(wd, toy_npz, tmp_path):
    mask = workdir_lib.mask_path(wd, "imp_k0", 1, 2)
    out = _cli("eval-mask", *_smoke(toy_npz), f"--mask={mask}", f"--workdir={tmp_path}",
               "--seed=1")
    assert out.returncode == 0, out.stderr[-3000:]
    res = fileio.read_json(eval_mask.result_path(str(tmp_path)))
    rec = _record(wd, "imp_k0", 1, 2)
    assert res["test_accuracy"] == rec["test_accuracy"] and res["test_loss"] == rec["test_loss"]
    assert res["sparsity"] == rec["sparsity"] and res["mask_sha256"] == eval_mask.sha256(mask)
    assert res["config"]["train"]["batch_size"] == 40
    assert f"test accuracy {rec['test_accuracy']:.4f}" in out.stdout


def test_eval_mask_refuses_masks_that_do_not_fit(wd, toy_npz, tmp_path, wd_setup):
    like = jax.eval_shape(wd_setup.init_fn, jax.random.key(0))["params"]
    with np.load(workdir_lib.mask_path(wd, "imp_k0", 0, 1)) as z:
        good = {k: z[k] for k in z.files}
    cases = {"key": ({k.replace("fc1/kernel", "fc1/w"): v for k, v in good.items()},
                     "missing 'fc1/kernel'; extra 'fc1/w'"),
             "shape": (dict(good, **{"fc2/kernel": np.ones((3, 3), bool)}),
                       "wrong shape 'fc2/kernel'"),
             "extra": (dict(good, **{"fc9/kernel": np.ones((2, 2), bool)}), "extra 'fc9/kernel'"),
             "dtype": (dict(good, **{"head/kernel": good["head/kernel"].astype(np.float32)}),
                       "not bool 'head/kernel' float32"),
             "bias": (dict(good, **{"head/bias": np.zeros(10, bool)}), "never-pruned")}
    for name, (arrays, msg) in cases.items():
        path = str(tmp_path / f"{name}.npz")
        np.savez(path, **arrays)
        with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            eval_mask.check_mask_file(path, like)
    eval_mask.check_mask_file(workdir_lib.mask_path(wd, "imp_k0", 0, 1), like)  # fits
    out = _cli("eval-mask", *_smoke(toy_npz), f"--mask={tmp_path / 'extra.npz'}",
               f"--workdir={tmp_path / 'ev'}")
    _one_line_error(out, "extra.npz does not fit the model", "extra 'fc9/kernel'")
    assert not os.path.exists(tmp_path / "ev")


# ---- report: merge, refusal, std convention ---------------------------------------------------

def _split(wd, seed, dest):
    """A one-seed workdir holding ``wd``'s seed ``seed``, as a one-seed-per-workdir sweep makes."""
    os.makedirs(workdir_lib.runs_dir(dest))
    cfg = dict(fileio.read_json(workdir_lib.config_path(wd)), seed=seed, seeds=1)
    fileio.write_json(workdir_lib.config_path(dest), cfg)
    fileio.write_jsonl(workdir_lib.rounds_path(dest), [r for r in fileio.read_jsonl(
        workdir_lib.rounds_path(wd)) if r["seed"] == seed])
    shutil.copy(workdir_lib.summary_path(wd), workdir_lib.summary_path(dest))
    for label, s in workdir_lib.list_runs(wd):
        if s == seed:
            shutil.copytree(workdir_lib.run_dir(wd, label, s), workdir_lib.run_dir(dest, label, s),
                            ignore=shutil.ignore_patterns("checkpoints"))
    return dest


def _tables(text):
    return [line for line in text.splitlines() if line.startswith("|")]


def test_merged_one_seed_workdirs_equal_the_two_seed_report(wd, tmp_path):
    a, b = _split(wd, 0, str(tmp_path / "a")), _split(wd, 1, str(tmp_path / "b"))
    out = subprocess.run([sys.executable, "-m", "dp_jax.report", a, b,
                          f"--out={tmp_path / 'merged'}"], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    merged = open(workdir_lib.report_path(str(tmp_path / "merged"))).read()
    two_seed = open(workdir_lib.report_path(wd)).read()
    assert _tables(merged) == _tables(two_seed) and "(n=2)" in merged
    assert "Merged from" in merged and os.path.exists(tmp_path / "merged" / "plots")
    single = report.write_report(a)  # one seed: no ± anywhere in the accuracy table
    assert "±" not in "\n".join(_tables(single)) and "(n=1)" in single


def test_merge_refuses_differing_settings_and_records(wd, tmp_path, capsys):
    a, b = _split(wd, 0, str(tmp_path / "a")), _split(wd, 1, str(tmp_path / "b"))
    cfg = fileio.read_json(workdir_lib.config_path(b))
    cfg["train"]["lr"] = 0.1
    fileio.write_json(workdir_lib.config_path(b), cfg)
    with pytest.raises(ValueError, match=r"settings differ in train\.lr \(0\.05 vs 0\.1\)"):
        report.write_report(str(tmp_path / "m"), sources=[a, b])
    c = _split(wd, 0, str(tmp_path / "c"))  # the same seed again: same records are fine
    assert "(n=1)" in report.write_report(str(tmp_path / "m"), sources=[a, c])
    rows = fileio.read_jsonl(workdir_lib.rounds_path(c))
    rows[-1]["test_accuracy"] = 0.123  # other records of that run, written as a run writes them
    fileio.write_jsonl(workdir_lib.rounds_path(c), rows)
    label, seed = rows[-1]["method"], rows[-1]["seed"]
    fileio.write_jsonl(workdir_lib.run_rounds_path(c, label, seed),
                       [r for r in rows if (r["method"], r["seed"]) == (label, seed)])
    integrity.record(workdir_lib.run_dir(c, label, seed), workdir_lib.ROUNDS)
    for args, needles in (([a, c, f"--out={tmp_path / 'm'}"], ("both hold", "different records")),
                          ([a, c], ("need --out",))):
        with pytest.raises(SystemExit) as exit_:  # the subcommand's own entry, in-process
            cli.cmd_report(args)
        err = capsys.readouterr().err.strip()
        assert exit_.value.code == 2 and len(err.splitlines()) == 1, err
        assert err.startswith("error: ") and all(n in err for n in needles), err


def test_merge_compares_distillation_settings_only_where_runs_read_them(wd, tmp_path):
    a, b = _split(wd, 0, str(tmp_path / "a")), _split(wd, 1, str(tmp_path / "b"))
    cfg = fileio.read_json(workdir_lib.config_path(b))
    cfg["distill"]["iterations"] += 1  # none of wd's runs (IMP, random) reads distill.*
    fileio.write_json(workdir_lib.config_path(b), cfg)
    assert "(n=2)" in report.write_report(str(tmp_path / "m"), sources=[a, b])
    # Once a run of each workdir has read the section, the difference decides its results.
    for d, its_cfg in ((a, fileio.read_json(workdir_lib.config_path(a))), (b, cfg)):
        label, seed = workdir_lib.list_runs(d)[0]
        path = workdir_lib.identity_path(d, label, seed)
        fileio.write_json(path, dict(fileio.read_json(path),
                                 **{"distill.iterations": its_cfg["distill"]["iterations"]}))
    with pytest.raises(ValueError, match=r"settings differ in distill\.iterations"):
        report.write_report(str(tmp_path / "m2"), sources=[a, b])


def test_merged_phase_costs_average_only_the_workdirs_that_ran_them(wd, tmp_path):
    from dp_jax.reports import merge as report_merge
    a, b = _split(wd, 0, str(tmp_path / "a")), _split(wd, 1, str(tmp_path / "b"))
    for d, phases in ((a, {"dense_s": 10.0, "distill_examples": 120000, "distill_wall_s": 90.0}),
                      (b, {"dense_s": 20.0})):  # b ran no method that distils
        fileio.write_json(workdir_lib.summary_path(d),
                      dict(fileio.read_json(workdir_lib.summary_path(d)), phases_s=phases))
    merged = report_merge.gather([a, b])["summary"]["phases_s"]
    assert merged == {"dense_s": 15.0, "distill_examples": 120000.0, "distill_wall_s": 90.0}


def test_tables_use_the_sample_std_with_n(wd):
    rows = [dict(method="imp_k0", round=0, seed=s, sparsity=0.0, test_accuracy=acc,
                 train_examples=0, wall_s=1.0) for s, acc in enumerate([0.90, 0.94])]
    table = report.accuracy_table(report.aggregate(rows))
    assert "| 92.00 ± 2.83 (n=2) |" in table  # |0.94 - 0.90| / sqrt(2) = 0.0283
    assert "±" not in report.accuracy_table(report.aggregate(rows[:1]))
    # The real two-seed report: random's last round, by hand from its records.
    accs = [_record(wd, "random", s, 2)["test_accuracy"] for s in (0, 1)]
    cell = (f"{100 * np.mean(accs):.2f} ± {100 * abs(accs[0] - accs[1]) / math.sqrt(2):.2f} "
            "(n=2)")
    line = next(x for x in _tables(open(workdir_lib.report_path(wd)).read())
                if x.startswith("| 2 |"))
    assert cell in line, (cell, line)


# ---- analyze ---------------------------------------------------------------------------------

def test_analyze_subcommand(wd, tmp_path):
    out = _cli("analyze", f"--workdir={wd}", "--analyses=bogus")
    _one_line_error(out, "--analyses: unknown ['bogus']")
    copy = str(tmp_path / "wd")
    shutil.copytree(wd, copy)
    out = _cli("analyze", f"--workdir={copy}", "--report_only")
    assert out.returncode == 0, out.stderr[-3000:]
    assert report.ANALYSIS_BEGIN in open(workdir_lib.report_path(copy)).read()


@pytest.mark.parametrize("args, needle", [
    (["--nosuchflag"], "Unknown command line flag 'nosuchflag'"),
    (["--config.seed=9223372036854775808"], "config.seed=9223372036854775808 is invalid"),
    (["--config.train.decay_at=abc"], "config.train.decay_at=('abc',) is invalid"),
    (["--config.seeds=0"], "config.seeds=0 is invalid"),
])
def test_flag_and_value_errors_are_one_line_exit_2(args, needle, tmp_path):
    """absl's flag errors and values the checks once let through: one line, exit 2, no work."""
    wd = tmp_path / "wd"
    out = subprocess.run([sys.executable, "-m", "dp_jax.main", "--config=fashion_mnist:smoke",
                          f"--workdir={wd}", *args], cwd=ROOT, env=ENV, capture_output=True,
                         text=True, timeout=300)
    _one_line_error(out, needle)
    assert not wd.exists()
