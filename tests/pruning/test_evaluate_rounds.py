"""``prune.evaluate``: only the named rounds are trained and tested, every mask is still made.

The reference is the same experiment with every round trained: the skipped rounds' masks, the
trained rounds' records and the methods whose masks need every training (IMP, LRR) must be
identical to it, and a skipped round exported later must retrain to that run's record.
"""

import os

import numpy as np
import pytest

from dp_jax import rng
from dp_jax.analysis import resume
from dp_jax.pruning import records as records_lib
from dp_jax.pruning.plan import TRAINED, Plan, Start, parse_evaluate, rounds_to_train
from dp_jax.rundir import paths
from dp_jax.storage import fileio
from dp_jax.tasks import export
from dp_jax.tasks import prune as experiment
from dp_jax.tasks import settings as settings_lib

from conftest import load_config_module

METHODS = "imp,lrr,snip,shuffle:of=snip"


def _config(tiny_config, evaluate, **kw):
    c = tiny_config
    c.prune.rounds, c.prune.fraction, c.prune.method = 3, 0.5, METHODS
    c.prune.evaluate = evaluate
    for k, v in kw.items():
        section, field = k.split("__")
        c[section][field] = v
    return c


@pytest.fixture(scope="module")
def workdirs(toy_npz, tmp_path_factory):
    def tiny():
        c = load_config_module("fashion_mnist").get_config("smoke")
        c.data.name, c.data.train_size = f"npz:{toy_npz}", 0
        c.train.batch_size, c.train.epochs, c.train.eval_batch_size = 40, 2, 64
        return c
    out = {}
    for name, ev in (("all", ""), ("last", "3")):
        wd = str(tmp_path_factory.mktemp(name))
        experiment.run(_config(tiny(), ev), wd, progress=False)
        out[name] = wd
    return out


def _rows(wd, label):
    rows = fileio.read_jsonl(os.path.join(wd, "rounds.jsonl"))
    return {r["round"]: r for r in rows if r["method"] == label}


def _mask(wd, label, rnd):
    with np.load(paths.mask_path(wd, label, 0, rnd)) as z:
        return {k: z[k] for k in z.files}


def test_skipped_rounds_make_the_same_masks_and_no_accuracy(workdirs):
    for label in ("snip", "shuffle_snip"):
        full, part = _rows(workdirs["all"], label), _rows(workdirs["last"], label)
        assert sorted(part) == [0, 1, 2, 3]
        assert [part[r]["test_accuracy"] for r in (1, 2)] == [None, None]
        assert all(full[r]["test_accuracy"] is not None for r in full)
        for r in range(4):
            a, b = _mask(workdirs["all"], label, r), _mask(workdirs["last"], label, r)
            assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
            assert part[r]["sparsity"] == full[r]["sparsity"]
        # The trained round is the same training: bit-identical figures.
        for r in (0, 3):
            assert records_lib.without_timings(part[r]) == records_lib.without_timings(full[r])


def test_methods_that_need_every_training_train_every_round(workdirs):
    for label in ("imp_k0", "lrr"):
        full, part = _rows(workdirs["all"], label), _rows(workdirs["last"], label)
        assert sorted(part) == sorted(full) == [0, 1, 2, 3]
        for r in full:
            assert records_lib.without_timings(part[r]) == records_lib.without_timings(full[r])


def test_summary_and_report_use_only_trained_rounds(workdirs):
    full = fileio.read_json(os.path.join(workdirs["all"], "summary.json"))["methods"]
    part = fileio.read_json(os.path.join(workdirs["last"], "summary.json"))["methods"]
    for label in ("snip", "imp_k0"):
        assert part[label]["final_test_accuracy_mean"] == full[label]["final_test_accuracy_mean"]
    report = open(os.path.join(workdirs["last"], "report.md")).read()
    assert "None" not in report and "nan" not in report
    assert "not trained (`prune.evaluate`)" in report


def test_a_skipped_round_is_retrained_on_export_and_matches_the_full_run(workdirs, tmp_path):
    wd = workdirs["last"]
    settings = settings_lib.from_workdir(wd)[0]
    init = export.rebuild_setup(settings).init_fn(rng.key_for(0, rng.INIT))
    like = {"params": init["params"], "batch_stats": init.get("batch_stats", {})}
    assert resume.kept_trained(wd, "snip", 0, 1, like) is None  # its checkpoint is not round 1's
    assert resume.kept_trained(wd, "snip", 0, 3, like) is not None
    meta = export.export_ticket(wd, "snip", 0, 1, str(tmp_path / "t.npz"))
    assert meta["trained_source"] == "retrained" and meta["check"]["matches_record"] is None
    want = _rows(workdirs["all"], "snip")[1]
    assert meta["check"]["test_accuracy"] == want["test_accuracy"]
    assert meta["check"]["test_loss"] == want["test_loss"]
    with pytest.raises(ValueError, match="not trained in the run"):
        export.export_ticket(wd, "snip", 0, 1, str(tmp_path / "u.npz"), source="checkpoint")


@pytest.mark.parametrize("text, message", [
    ("0", "outside 1..3"), ("4", "outside 1..3"), ("x", "'x' is not a round"),
    ("2,,3", "'' is not a round")])
def test_bad_evaluate_is_refused_naming_the_field(tiny_config, text, message):
    c = _config(tiny_config, text)
    with pytest.raises(ValueError, match="config.prune.evaluate") as e:
        settings_lib.parse(c)
    assert message in str(e.value)


def test_rounds_to_train_follows_what_later_rounds_need():
    """Hand-written cases: IMP needs every training, LRR starts from it, DP-then-IMP needs the
    trainings from the round before its switch on, DP none."""
    def plan(uses):
        return Plan(next_mask=None, start_point=None, search_examples=None, uses_trained=uses)
    ev = parse_evaluate("2,5", 5)
    assert ev == frozenset({2, 5}) and parse_evaluate(" ", 5) is None
    cases = {
        "imp": (plan(lambda r: True), Start("rewind", 0), [0, 1, 2, 3, 4, 5]),
        "lrr": (plan(lambda r: True), TRAINED, [0, 1, 2, 3, 4, 5]),
        "dp_imp": (plan(lambda r: r > 3), Start("rewind", 0), [0, 2, 3, 4, 5]),
        "dp": (plan(lambda r: False), Start("rewind", 0), [0, 2, 5]),
    }
    for name, (p, start, want) in cases.items():
        trains = rounds_to_train(p, start, 5, ev)
        assert [r for r in range(6) if trains(r)] == want, name
        assert all(rounds_to_train(p, start, 5, None)(r) for r in range(6))


def test_seeds_as_one_program_skip_the_same_rounds(tiny_config, workdirs, tmp_path):
    c = _config(tiny_config, "3")
    c.prune.method, c.seeds, c.parallel.vmap_seeds = "snip", 2, "on"
    wd = str(tmp_path / "vmapped")
    experiment.run(c, wd, progress=False)
    seq = _rows(workdirs["last"], "snip")
    for seed in (0, 1):
        rows = {r["round"]: r for r in fileio.read_jsonl(os.path.join(wd, "rounds.jsonl"))
                if r["seed"] == seed}
        assert [rows[r]["test_accuracy"] is None for r in range(4)] == [False, True, True, False]
        if seed == 0:  # the batched kernels sum in another order: float tolerance
            assert rows[3]["test_accuracy"] == pytest.approx(seq[3]["test_accuracy"], abs=0.02)
            a, b = _mask(wd, "snip", 2), _mask(workdirs["last"], "snip", 2)
            assert all(np.array_equal(a[k], b[k]) for k in a)


def test_results_controls_pair_the_trained_rounds(workdirs):
    import dp_jax
    got = dp_jax.load_results(workdirs["last"]).controls()
    assert [(p["control"], p["source"], p["round"]) for p in got] == [
        ("shuffle_snip", "snip", 3)]
    want = (_rows(workdirs["last"], "shuffle_snip")[3]["test_accuracy"]
            - _rows(workdirs["last"], "snip")[3]["test_accuracy"])
    assert got[0]["diff_mean"] == pytest.approx(want, abs=1e-12) and got[0]["diff_std"] is None
