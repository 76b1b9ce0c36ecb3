"""Every reader of a workdir checks what it reads (dp_jax/rundir/verified.py): a truncated,
edited or missing mask, an edited or torn rounds.jsonl, a lost checksums.json, a damaged dense
or round checkpoint and an edited analysis result are each named in a one-line ValueError by
report, analyze, export, eval-mask and the Python API (exit status 2 on the command line), or
repaired from their source with a warning by the experiment; never used."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, load_config_module
from dp_jax.analysis import settings as analysis_settings
from dp_jax.reports import analysis as analysis_report
from dp_jax.reports import pruning as report
from dp_jax.rundir import paths, verified
from dp_jax.storage import fileio, integrity
from dp_jax.tasks import analyze, eval_mask, export, results
from dp_jax.tasks import prune as experiment

RUN = os.path.join("runs", "imp_k0-seed0")
# No persistent compilation cache: a cache entry made on another CPU logs its own lines.
ENV = dict(os.environ, JAX_PLATFORMS="cpu", DP_JAX_COMPILE_CACHE="off")
HESSIAN = analysis_settings.Settings(hessian_examples=40, lanczos_steps=6, top_k=2,
                                     trace_probes=2, slq_probes=1)


def _config(toy_npz):
    c = load_config_module("fashion_mnist").get_config("smoke")
    c.data.name, c.data.train_size = f"npz:{toy_npz}", 0
    c.train.batch_size = 40
    c.prune.method = "imp,imp:k=5"  # k=5 rewinds to the dense run's checkpoint
    c.metrics.tensorboard = False
    return c


@pytest.fixture(scope="module")
def made(tmp_path_factory, toy_npz):
    """A finished workdir (imp_k0, imp_k5; rounds 0..2) with a Hessian analysis of round 1."""
    c = _config(toy_npz)
    wd = str(tmp_path_factory.mktemp("verified") / "wd")
    experiment.run(c, wd)
    analyze.run(wd, analyses=["hessian"], rounds=[1], settings=HESSIAN)
    return c, wd


@pytest.fixture
def wd(made, tmp_path):
    """A copy of the finished workdir, to damage."""
    dest = str(tmp_path / "wd")
    shutil.copytree(made[1], dest)
    return dest


def _refused(fn, *needles):
    """``fn()`` raises a one-line ValueError holding every needle."""
    with pytest.raises(ValueError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert all(n in msg for n in needles), msg
    return msg


def _cli(*args):
    out = subprocess.run([sys.executable, "-m", "dp_jax.cli.main", *args], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=300)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2, out.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-2000:]
    return lines[0]


def _flip_a_byte(directory):
    files = [os.path.join(r, f) for r, _, fs in os.walk(directory) for f in fs]
    big = max(files, key=os.path.getsize)
    with open(big, "r+b") as f:
        f.seek(os.path.getsize(big) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x40]))


def _mask(wd, rnd):
    return os.path.join(wd, RUN, "masks", f"round_{rnd:03d}.npz")


def _edit_mask(path):
    """A valid npz with other content: the first kernel's mask inverted."""
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["fc1/kernel"] = ~arrays["fc1/kernel"]
    np.savez_compressed(path, **arrays)


def _strip(rows):
    return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows]


# ---- masks ------------------------------------------------------------------------------------

def test_truncated_mask_is_named_by_the_report(wd):
    path = _mask(wd, 2)
    os.truncate(path, os.path.getsize(path) // 2)
    _refused(lambda: report.write_report(wd), path, "damaged (checksum mismatch)")


def test_edited_mask_is_refused_by_every_reader(wd):
    path = _mask(wd, 1)
    _edit_mask(path)
    for read in (lambda: report.write_report(wd),
                 lambda: analyze.run(wd, analyses=["hessian"], settings=HESSIAN),
                 lambda: results.load_results(wd).mask("imp_k0", 0, 1),
                 lambda: export.build_ticket(wd, "imp_k0", 0, 1),
                 lambda: eval_mask.check_mask_file(path, {})):
        _refused(read, path, "damaged (checksum mismatch)")
    assert _cli("report", wd) == f"error: mask {path} is damaged (checksum mismatch)"


def test_missing_mask_is_an_error_not_a_skip(wd):
    path = _mask(wd, 1)
    os.unlink(path)
    _refused(lambda: report.write_report(wd), path, "missing")
    _refused(lambda: analyze.run(wd, analyses=["hessian"], runs=["imp_k0"], settings=HESSIAN),
             path, "missing")


# ---- records ----------------------------------------------------------------------------------

def test_edited_accuracy_in_rounds_jsonl_is_refused(wd):
    top = paths.rounds_path(wd)
    rows = fileio.read_jsonl(top)
    rows[1]["test_accuracy"] = 0.123
    fileio.write_jsonl(top, rows)
    _refused(lambda: report.write_report(wd), top, "differ from",
             paths.run_rounds_path(wd, "imp_k0", 0))
    _refused(lambda: results.load_results(wd), top, "differ from")
    own = paths.run_rounds_path(wd, "imp_k0", 0)
    fileio.write_jsonl(own, rows[:3])  # the run's own file edited alike
    for read in (lambda: report.write_report(wd), lambda: export.build_ticket(wd, "imp_k0", 0, 1),
                 lambda: analyze.run(wd, analyses=["hessian"], settings=HESSIAN)):
        _refused(read, own, "damaged (checksum mismatch)")


def test_torn_last_line_of_rounds_jsonl_is_damage(wd, tmp_path):
    top = paths.rounds_path(wd)
    text = open(top).read()
    with open(top, "w") as f:
        f.write(text[:-30])
    msg = _refused(lambda: report.write_report(wd), top, "damaged")
    assert _cli("report", wd) == f"error: {msg}"
    # A metrics stream may end torn (appended live); a records file may not.
    streamed = str(tmp_path / "s.jsonl")
    with open(streamed, "w") as f:
        f.write('{"a": 1}\n{"a": 2}\n{"a"')
    assert fileio.read_jsonl(streamed) == [{"a": 1}, {"a": 2}]
    _refused(lambda: fileio.read_jsonl(streamed, strict=True), streamed, ":3 is not valid JSON")
    with open(streamed, "w") as f:
        f.write('{"a": 1}\n{"a": 2}')  # the newline cut: the last line parses, yet is torn
    _refused(lambda: fileio.read_jsonl(streamed, strict=True), streamed, "torn last line")


# ---- the manifest and the marker --------------------------------------------------------------

def test_new_runs_carry_the_marker_and_a_lost_manifest_is_damage(made, wd):
    c, _ = made
    for label in ("dense", "imp_k0", "imp_k5"):
        assert fileio.read_json(paths.identity_path(wd, label, 0))[paths.CHECKSUMS] == 1
    manifest = os.path.join(wd, RUN, integrity.MANIFEST)
    os.unlink(manifest)
    for read in (lambda: report.write_report(wd), lambda: export.build_ticket(wd, "imp_k0", 0, 1),
                 lambda: analyze.run(wd, analyses=["hessian"], settings=HESSIAN),
                 lambda: eval_mask.check_mask_file(_mask(wd, 1), {})):
        _refused(read, "not recorded", f"{manifest} is missing")
    # The experiment repairs it: every round of the run is recomputed, to the same records.
    before = fileio.read_jsonl(paths.run_rounds_path(wd, "imp_k0", 0))
    with pytest.warns(RuntimeWarning, match=f"{integrity.MANIFEST} is missing"):
        experiment.run(c, wd)
    assert _strip(fileio.read_jsonl(paths.run_rounds_path(wd, "imp_k0", 0))) == _strip(before)
    report.write_report(wd)


def test_a_run_made_before_checksums_is_read_then_adopted(made, wd):
    """No manifest and no marker: trusted as before; the next resume records and marks it."""
    c, _ = made
    for label in ("dense", "imp_k0"):
        path = paths.identity_path(wd, label, 0)
        fields = fileio.read_json(path)
        fields.pop(paths.CHECKSUMS)
        fileio.write_json(path, fields)
        os.unlink(os.path.join(paths.run_dir(wd, label, 0), integrity.MANIFEST))
    report.write_report(wd)
    export.build_ticket(wd, "imp_k5", 0, 1)  # reads the unrecorded dense checkpoint as before
    experiment.run(c, wd)  # nothing to compute; adopts the two runs
    for label, rels in (("dense", ["checkpoints/0"]),
                        ("imp_k0", ["checkpoints/2", "masks/round_001.npz", "rounds.jsonl"])):
        assert fileio.read_json(paths.identity_path(wd, label, 0))[paths.CHECKSUMS] == 1
        assert all(integrity.problem(paths.run_dir(wd, label, 0), r) is None for r in rels)


# ---- checkpoints ------------------------------------------------------------------------------

def test_damaged_dense_checkpoint_is_refused_by_export_and_retrained_by_the_run(made, wd):
    c, _ = made
    ckpt = os.path.join(paths.checkpoints_dir(wd, paths.DENSE, 0), "0")
    _flip_a_byte(ckpt)
    _refused(lambda: export.build_ticket(wd, "imp_k5", 0, 1), f"dense checkpoint {ckpt}",
             "damaged (checksum mismatch)")
    before = fileio.read_jsonl(paths.rounds_path(wd))
    with pytest.warns(RuntimeWarning, match=f"dense checkpoint {ckpt} is damaged"):
        experiment.run(c, wd)
    assert integrity.problem(paths.run_dir(wd, paths.DENSE, 0), "checkpoints/0") is None
    assert _strip(fileio.read_jsonl(paths.rounds_path(wd))) == _strip(before)


def test_damaged_round_checkpoint_is_refused_by_export(wd, tmp_path):
    ckpt = os.path.join(paths.checkpoints_dir(wd, "imp_k0", 0), "1")
    _flip_a_byte(ckpt)
    _refused(lambda: export.build_ticket(wd, "imp_k0", 0, 1), f"round checkpoint {ckpt}",
             "damaged (checksum mismatch)", "--source=retrain")
    out = str(tmp_path / "t.npz")
    line = _cli("export", f"--workdir={wd}", "--run=imp_k0", "--seed=0", "--round=1",
                f"--out={out}")
    assert ckpt in line and "damaged" in line and not os.path.exists(out)


# ---- analysis results -------------------------------------------------------------------------

def test_edited_analysis_result_is_refused_by_report_only(wd):
    adir = paths.analysis_dir(wd)
    name = paths.analysis_file("hessian", "imp_k0", 0, 1)
    path = os.path.join(adir, name)
    result = fileio.read_json(path)
    result["trace"] = 0.0
    fileio.write_json(path, result)
    _refused(lambda: analysis_report.write(wd), path, "damaged (checksum mismatch)")
    line = _cli("analyze", f"--workdir={wd}", "--report_only")
    assert line == f"error: analysis result {path} is damaged (checksum mismatch)"
    os.unlink(os.path.join(adir, integrity.MANIFEST))  # beside the done_ records: damage too
    _refused(lambda: analysis_report.write(wd), "not recorded",
             f"{os.path.join(adir, integrity.MANIFEST)} is missing")


def test_analysis_summaries_are_recorded_when_written(wd):
    adir = paths.analysis_dir(wd)
    assert integrity.problem(adir, "masks.json") is None  # two runs analysed: mask distances
    curve = os.path.join(adir, "instability_dense_k_seed0.json")

    def curve_maker():  # as a rewind-curve maker writes its own summary file
        fileio.write_json(curve, {"seed": 0, "k": [0], "barrier": [0.0]})
    analyze._recording(wd, curve_maker)
    assert integrity.problem(adir, os.path.basename(curve)) is None
    with open(curve, "a") as f:
        f.write(" ")
    _refused(lambda: analysis_report.write(wd), curve, "damaged (checksum mismatch)")
    with open(os.path.join(adir, "masks.json"), "a") as f:
        f.write(" ")
    _refused(lambda: verified.analysis_json(wd, "masks.json"), "masks.json",
             "damaged (checksum mismatch)")


def test_manifest_messages(tmp_path):
    d = str(tmp_path)
    with open(os.path.join(d, "a.txt"), "w") as f:
        f.write("a")
    _refused(lambda: integrity.verified(d, "a.txt", "file"), "a.txt is not recorded",
             f"{integrity.MANIFEST} is missing")
    assert integrity.verified(d, "a.txt", "file", required=False) == os.path.join(d, "a.txt")
    integrity.record(d, "a.txt")
    assert integrity.verified(d, "a.txt", "file") == os.path.join(d, "a.txt")
    with open(os.path.join(d, "a.txt"), "w") as f:
        f.write("b")
    _refused(lambda: integrity.verified(d, "a.txt", "file", required=False), "damaged")
    _refused(lambda: integrity.verified(d, "b.txt", "file", required=False), "b.txt is missing")
    with open(os.path.join(d, integrity.MANIFEST), "w") as f:
        f.write("{")
    _refused(lambda: integrity.verified(d, "a.txt", "file"), f"{integrity.MANIFEST} is unreadable")


def test_a_workdir_made_before_the_marker_reads_as_before(tmp_path):
    """tests/fixtures/workdir_v0: masks and checkpoints recorded, records and the dense run not,
    no marker. It is reported as it is; what its manifests record is still checked."""
    wd = str(tmp_path / "wd")
    shutil.copytree(os.path.join(ROOT, "tests", "fixtures", "workdir_v0", "wd"), wd)
    assert "| 2 |" in report.write_report(wd)
    _edit_mask(_mask(wd, 2))
    _refused(lambda: report.write_report(wd), _mask(wd, 2), "damaged (checksum mismatch)")
