"""Bad inputs are refused before any work, in one line, with exit status 2, naming the field and
the allowed values; degenerate-but-legal settings are warned about.

The command-line cases run as subprocesses (``python -m ...``) on the generated toy dataset and
check: status 2, exactly one line on stderr (``error: ...``) naming the field, and that nothing
was written (the workdir does not exist afterwards, or the output file was not written).
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from dp_jax import masks as masks_lib
from dp_jax.cli import common as cli_common
from dp_jax.config import defaults
from dp_jax.config import files as config_files
from dp_jax.pruning import setup as setup_lib
from dp_jax.pruning.plan import remaining_per_round
from dp_jax.reports import pruning as report
from dp_jax.storage import fileio
from dp_jax.tasks import prune as experiment
from dp_jax.tasks import settings as settings_lib

from conftest import ROOT, load_config_module, make_npz

ENV = dict(os.environ, JAX_PLATFORMS="cpu")


def _run(*args, env=ENV, timeout=300):
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _one_line_error(out, *needles):
    """Exit status 2, one line on stderr, every needle in it."""
    assert out.returncode == 2, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-3000:]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _smoke(npz):
    """A one-round, one-method run of the smoke config on ``npz`` (seconds)."""
    return ["--config=fashion_mnist:smoke", f"--config.data.name=npz:{npz}",
            "--config.data.train_size=0", "--config.train.batch_size=40",
            "--config.train.epochs=1", "--config.prune.rounds=1", "--config.prune.method=imp"]


def _refused_run(npz, tmp_path, *args, needles=()):
    """``dp-jax run`` with ``args`` fails in one line naming ``needles`` and writes nothing."""
    wd = tmp_path / "wd"
    out = _run("dp_jax.cli", "run", *_smoke(npz), *args, f"--workdir={wd}")
    line = _one_line_error(out, *needles)
    assert not wd.exists(), "a refused run wrote to its workdir"
    return line


@pytest.fixture
def tiny(tiny_config):
    """The conftest's tiny config, one method, one training epoch."""
    tiny_config.prune.method = "imp"
    tiny_config.train.epochs = 1
    return tiny_config


# ---- config values: refused in parse / validate_with_data, before the workdir is made ----------

@pytest.mark.parametrize("args, needles", [
    # 1e9 would keep every layer whole: nothing is ever pruned.
    (["--config.prune.min_per_layer=1000000000"],
     ["config.prune.min_per_layer=1000000000", "[0, 1000]", "'head/kernel'"]),
    # subset takes DP's step size, which without a distilled set and dp.lr is not there; this
    # once failed only after the dense training.
    (["--config.prune.method=subset:n=20"], ["config.dp.subset_lr=0.0", "dp.lr > 0"]),
    # dp.epochs silently replaced dp.steps.
    (["--config.prune.method=subset:n=20", "--config.dp.subset_lr=0.1", "--config.dp.epochs=2",
      "--config.dp.steps=50"], ["config.dp.epochs=2", "config.dp.steps=50", "default 300"]),
    (["--config.prune.method=dp", "--config.distill.buffer_dir=FILE"],
     ["config.distill.buffer_dir=", "is a file", "a directory"]),
    (["--config.data.classes=(0,12)"], ["config.data.classes=(0, 12)", "[0, 10)"]),
    (["--config.data.classes=(3,)"], ["config.data.classes=(3,)", "at least 2 distinct"]),
    (["--config.seed=9223372036854775808"], ["config.seed=", "[0, 2**31)"]),
])
def test_bad_config_values_are_refused_before_work(toy_npz, tmp_path, args, needles):
    args = [a.replace("FILE", toy_npz) for a in args]
    _refused_run(toy_npz, tmp_path, *args, needles=needles)


def test_one_class_dataset_is_refused_whatever_its_label(tmp_path):
    """Labels all 1 pass the range check [0, 2) yet make a one-class problem."""
    path = make_npz(tmp_path / "one.npz", num_classes=10)
    arrays = dict(np.load(path))
    arrays["y_train"][:] = 1
    arrays["y_test"][:] = 1
    np.savez(path, **arrays)
    _refused_run(path, tmp_path, needles=["config.data.name=", "1 class (labels [1])",
                                          "at least 2 classes"])


def test_failing_plugin_is_one_line_naming_field_and_module(toy_npz, tmp_path):
    (tmp_path / "bad_plugin_mod.py").write_text("raise RuntimeError('plugin\\nbroken')\n")
    env = dict(ENV, PYTHONPATH=os.pathsep.join([str(tmp_path), ENV.get("PYTHONPATH", "")]))
    wd = tmp_path / "wd"
    out = _run("dp_jax.cli", "run", *_smoke(toy_npz), "--config.prune.plugins=bad_plugin_mod",
               f"--workdir={wd}", env=env)
    _one_line_error(out, "config.prune.plugins", "'bad_plugin_mod'", "RuntimeError: plugin broken")
    assert not wd.exists()


@pytest.mark.parametrize("command", [["dp_jax.main"], ["dp_jax.cli", "run"],
                                     ["dp_jax.cli", "eval-mask", "--mask=m.npz"]])
def test_unknown_config_variant_is_one_line(command, tmp_path):
    """absl's config flag printed the variant's ValueError inside a traceback."""
    wd = tmp_path / "wd"
    out = _run(*command, "--config=configs/fashion_mnist.py:nosuchvariant", f"--workdir={wd}")
    _one_line_error(out, "unknown variant 'nosuchvariant'", "smoke, conv, converged")
    assert not wd.exists()


def test_config_file_errors_are_one_line(tmp_path):
    """A config file that raises (not a ValueError) or lacks get_config: one ValueError line."""
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(variant=''):\n    return {}['nope']\n")
    with pytest.raises(ValueError, match=r"--config=.*broken.py: get_config\(''\) failed: "
                                         r"KeyError"):
        config_files.load_config(str(broken))
    empty = tmp_path / "empty.py"
    empty.write_text("X = 1\n")
    with pytest.raises(ValueError, match="defines no get_config"):
        config_files.load_config(str(empty))
    out = _run("dp_jax.main", f"--config={broken}", f"--workdir={tmp_path / 'wd'}")
    _one_line_error(out, "get_config('') failed: KeyError")


# ---- flags: absl and argparse errors of every entry point are one line, exit 2 ----------------

@pytest.mark.parametrize("argv, needle", [
    ("dp_jax.main --config=fashion_mnist:smoke --workdir={wd} --nosuchflag", "'nosuchflag'"),
    ("dp_jax.cli run --config=fashion_mnist:smoke --workdir={wd} --config.seeds=x",
     "--config.seeds=x"),
    ("dp_jax.analysis --workdir={wd} --nosuchflag", "'nosuchflag'"),
    ("dp_jax.analysis --workdir={wd} --seed=x", "--seed=x"),
    ("dp_jax.cli analyze --workdir={wd} --seed=-1", "--seed=-1"),
    ("dp_jax.cli export --workdir={wd} --run=imp_k0 --seed=x --round=0 --out={wd}/t.npz",
     "--seed=x"),
    ("dp_jax.cli export --workdir={wd} --run=imp_k0 --seed=9223372036854775808 --round=0 "
     "--out={wd}/t.npz", "--seed=9223372036854775808"),
    ("dp_jax.cli eval-mask --config=fashion_mnist:smoke --mask=m.npz --workdir={wd} --seed=x",
     "--seed=x"),
    ("dp_jax.cli eval-mask --config=fashion_mnist:smoke --mask=m.npz --workdir={wd} "
     "--config.nosuch=1", "config.nosuch"),
    ("dp_jax.report {wd} --nosuchflag", "unrecognized arguments"),
    ("dp_jax.distill.convert --nosuchflag", "--format"),
    ("dp_jax.distill.compare {wd}", "--out"),
    ("dp_jax.distill.quality a=b,c --out={wd} --seeds=x", "--seeds=x"),
    ("dp_jax.cli import-distilled --format=npz", "--out"),
])
def test_flag_errors_of_every_entry_point_are_one_line(argv, needle, tmp_path):
    wd = tmp_path / "wd"
    _one_line_error(_run(*argv.format(wd=wd).split()), needle)
    assert not wd.exists()


def test_analysis_shim_errors_are_one_line(tmp_path):
    """``python -m dp_jax.analysis`` on a directory that is no workdir (was a traceback)."""
    out = _run("dp_jax.analysis", f"--workdir={tmp_path}")
    _one_line_error(out, f"--workdir={tmp_path} has no config.json")


def test_one_line_squashes_wrapped_tracebacks():
    msg = ("flag --config=x.py:bad: Error whilst parsing config file:\n\nTraceback (most "
           "recent call last):\n  File ...\nValueError: unknown variant 'bad'\n")
    assert cli_common._one_line(msg) == ("flag --config=x.py:bad: Error whilst parsing config "
                                         "file: ValueError: unknown variant 'bad'")
    assert cli_common._one_line("one line") == "one line"


# ---- outputs: writability checked before each command's work ---------------------------------

@pytest.fixture
def a_file(tmp_path):
    """A plain file: a path below it can never be written (whoever runs the tests)."""
    f = tmp_path / "plain"
    f.write_text("x")
    return f


@pytest.mark.parametrize("argv, needle", [
    # Each names a workdir or data that does not exist: refusing the output first proves the
    # check comes before the command reads anything (export and eval-mask once failed only
    # after all their work).
    ("dp_jax.cli export --workdir={nowd} --run=imp_k0 --seed=0 --round=1 --out={f}/t.npz",
     "--out="),
    ("dp_jax.cli export --workdir={nowd} --run=imp_k0 --seed=0 --round=1 --out={d}",
     "is a directory"),
    ("dp_jax.cli eval-mask --config=fashion_mnist:smoke --config.data.name=npz:/nonexistent.npz "
     "--mask={mask} --workdir={f}/wd", "--workdir="),
    ("dp_jax.cli analyze --workdir={f}/wd", "--workdir="),
    ("dp_jax.analysis --workdir={f}/wd", "--workdir="),
    ("dp_jax.report {f}/wd", "--workdir="),
    ("dp_jax.cli report {nowd} {nowd}2 --out={f}/merged", "--out="),
    ("dp_jax.distill.compare {nowd} --out={f}/cmp", "--out="),
    ("dp_jax.distill.convert --format=npz --npz=/nonexistent.npz --out={f}/set.npz", "--out="),
])
def test_unwritable_outputs_are_refused_first(argv, needle, tmp_path, a_file):
    mask = tmp_path / "m.npz"
    mask.write_bytes(b"")
    args = argv.format(nowd=tmp_path / "nowd", f=a_file, d=tmp_path, mask=mask).split()
    line = _one_line_error(_run(*args), needle)
    assert "plain is a file" in line or "is a directory" in line, line
    assert a_file.read_text() == "x"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root writes into read-only directories")
def test_read_only_directories_are_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        out = _run("dp_jax.cli", "export", f"--workdir={tmp_path / 'nowd'}", "--run=imp_k0",
                   "--seed=0", "--round=1", f"--out={ro / 't.npz'}")
        _one_line_error(out, "--out=", "is not writable")
        out = _run("dp_jax.cli", "analyze", f"--workdir={ro / 'wd'}")
        _one_line_error(out, "--workdir=", "is not writable")
    finally:
        ro.chmod(0o755)


def test_check_output_names_the_flag(tmp_path, a_file, monkeypatch):
    cli_common.check_output("out", str(tmp_path / "new" / "t.npz"), file=True)  # can be made
    with pytest.raises(ValueError, match=r"--out=.*plain is a file; allowed: a directory"):
        cli_common.check_output("out", str(a_file))
    with pytest.raises(ValueError, match=r"--out=.* is a directory; allowed: a file path"):
        cli_common.check_output("out", str(tmp_path), file=True)
    monkeypatch.setattr(os, "access", lambda *a, **k: False)  # a read-only directory, for root too
    with pytest.raises(ValueError, match=r"--workdir=.*: .* is not writable"):
        cli_common.check_output("workdir", str(tmp_path / "wd"))


# ---- eval-mask: an all-zero mask ------------------------------------------------------------

def test_eval_mask_refuses_a_mask_that_keeps_no_weight(toy_npz, tiny, tmp_path):
    settings = settings_lib.parse(tiny)
    setup = setup_lib.build_setup(settings, setup_lib.load_data(settings))
    like = jax.eval_shape(setup.init_fn, jax.random.key(0))["params"]
    zero = jax.tree_util.tree_map_with_path(
        lambda p, v: np.full(v.shape, masks_lib.path_str(p) not in
                             masks_lib.prunable_leaves(like), bool), like)
    path = str(tmp_path / "zero.npz")
    masks_lib.save(path, zero)
    wd = tmp_path / "wd"
    out = _run("dp_jax.cli", "eval-mask", "--config=fashion_mnist:smoke",
               f"--config.data.name=npz:{toy_npz}", "--config.data.train_size=0",
               "--config.train.batch_size=40", f"--mask={path}", f"--workdir={wd}")
    _one_line_error(out, f"mask file {path} keeps none of the", "at least one weight")
    assert not (wd / "eval_mask.json").exists()


# ---- data.classes applies to the in-memory pipeline ------------------------------------------

def test_data_classes_select_and_relabel_in_memory(tiny):
    full = setup_lib.load_data(settings_lib.parse(tiny))
    tiny.data.classes = (7, 2, 4)
    sub = setup_lib.load_data(settings_lib.parse(tiny))
    assert sub.num_classes == 3
    # Relabelled in list order, as the stream pipeline's ClassSubset does.
    for new, old in enumerate((7, 2, 4)):
        assert (sub.y_train == new).sum() == (full.y_train == old).sum() > 0
        assert (sub.y_test == new).sum() == (full.y_test == old).sum() > 0
    assert len(sub.y_train) == sum((full.y_train == c).sum() for c in (7, 2, 4))
    tiny.data.classes = (2, 2)
    with pytest.raises(ValueError, match=r"config.data.classes=\(2, 2\) is invalid"):
        settings_lib.parse(tiny)


# ---- the schedule stall: warned in the log and in report.md --------------------------------

def test_remaining_per_round_follows_masks_prune():
    sizes = {"a": 1000, "b": 100, "c": 10}
    left = remaining_per_round(sizes, 0.99, 6, min_per_layer=1)
    assert left[:2] == [1110, 11] and left[-3:] == [3, 3, 3]
    # Rounding to 0 stalls too: 20% of 2 weights is 0 weights.
    assert remaining_per_round({"a": 2}, 0.2, 3) == [2, 2, 2, 2]
    # Layer-wise it is exact: the counts masks.prune leaves, round by round.
    rng = np.random.default_rng(0)
    params = {k: {"kernel": np.zeros((n, 1), np.float32)} for k, n in sizes.items()}
    mask, counts = masks_lib.ones_like(params), []
    for _ in range(4):
        counts.append(masks_lib.count(mask)[0])
        scores = jax.tree.map(lambda x: rng.random(x.shape), params)
        mask = masks_lib.prune(scores, mask, 0.7, scope="layerwise", min_per_layer=2)
    assert remaining_per_round(sizes, 0.7, 3, scope="layerwise", min_per_layer=2) == counts


def test_a_stalling_schedule_is_warned_about(tiny, tmp_path, caplog):
    tiny.prune.fraction = 0.99
    tiny.prune.rounds = 6
    wd = str(tmp_path / "wd")
    with caplog.at_level("WARNING"):
        experiment.run(tiny, wd, progress=False)
    logged = [r.getMessage() for r in caplog.records if "stalls" in r.getMessage()]
    assert len(logged) == 1 and "rounds 4-6 prune nothing" in logged[0], logged
    rows = fileio.read_jsonl(os.path.join(wd, "rounds.jsonl"))
    left = [r["remaining_weights"] for r in sorted(rows, key=lambda r: r["round"])]
    assert left[3:] == [left[3]] * 4  # the warning told the truth
    text = open(os.path.join(wd, "report.md")).read()
    assert "**Warning:** IMP (k=0): rounds 4-6 pruned nothing" in text


def test_report_has_no_stall_warning_for_a_schedule_that_prunes():
    agg = {"imp_k0": [{"round": r, "sparsity": s} for r, s in enumerate((0, 0.5, 0.75))]}
    assert report.stall_notes(agg) == []
    agg["imp_k0"].append({"round": 3, "sparsity": 0.75})
    assert "rounds 3-3 pruned nothing" in report.stall_notes(agg)[0]


def test_epochs_alone_or_steps_alone_are_accepted(tiny):
    tiny.prune.method = "subset:n=20"
    tiny.dp.subset_lr = 0.1
    tiny.dp.epochs = 2
    assert settings_lib.parse(tiny).dp.by_epochs
    tiny.dp.epochs, tiny.dp.steps = 0, 50
    assert not settings_lib.parse(tiny).dp.by_epochs


@pytest.mark.parametrize("variant", ["paper,set=x.npz", "paper,smoke,set=x.npz"])
def test_paper_config_sets_epochs_without_steps(variant):
    c = load_config_module("cifar10_resnet18").get_config(variant)
    assert c.dp.epochs > 0 and c.dp.steps == defaults.section("dp")["steps"]
