"""``subset:n=N;select=...``: coreset selections for the real-subset control, their probe
networks, the selection file every subset run writes (and reads back), and the errors."""

import json
import os

import jax
import numpy as np
import pytest

from dp_jax import masks, methods, rng
from dp_jax.data import coresets, load_dataset, stratified_indices
from dp_jax.methods import subset
from dp_jax.pruning import setup as setup_lib
from dp_jax.storage import fileio
from dp_jax.tasks import prune as experiment
from dp_jax.tasks import settings as settings_lib

from conftest import load_config_module, make_distilled


def _rows(wd, label):
    return sorted((r for r in fileio.read_jsonl(os.path.join(wd, "rounds.jsonl"))
                   if r["method"] == label), key=lambda r: r["round"])


def _record(wd, label):
    with open(os.path.join(wd, "runs", f"{label}-seed0", subset.INDICES)) as f:
        return json.load(f)


@pytest.fixture
def config(tiny_config):
    c = tiny_config
    c.prune.rounds = 1
    c.dp.steps, c.dp.batch_size, c.dp.subset_lr = 10, 10, 0.05
    return c


def _setup(c):
    settings = settings_lib.parse(c)
    return setup_lib.build_setup(settings, setup_lib.load_data(settings))


def test_every_selection_takes_n_over_classes_of_each_class_and_records_it(config, tmp_path):
    c = config
    c.prune.method = ("subset:n=20,subset:n=20;select=herding,subset:n=20;select=kcenter,"
                      "subset:n=20;select=forgetting,subset:n=20;select=el2n_easy,"
                      "subset:n=20;select=el2n_hard")
    wd = str(tmp_path / "wd")
    experiment.run(c, wd)
    y = load_dataset(c.data, seed=c.seed).y_train
    chosen = {}
    for sel in coresets.SELECTIONS:
        label = "subset_n20" if sel == "random" else f"subset_n20_{sel}"
        rec = _record(wd, label)
        idx = np.asarray(rec["indices"])
        assert rec["select"] == sel and rec["n"] == 20 and rec["seed"] == 0
        assert np.all(np.diff(idx) > 0) and idx.size == 20
        np.testing.assert_array_equal(np.bincount(y[idx], minlength=10), np.full(10, 2))
        assert rec["per_class"] == [2] * 10
        chosen[sel] = set(idx.tolist())
        # Round 1 pays the probes: 2 epochs x 5 batches of 40 per network, plus one pass over
        # the 200 images per network scored by features or logits; then the inner loop's 100.
        probes = {"random": 0, "forgetting": 400, "herding": 600, "kcenter": 600,
                  "el2n_easy": 4 * 600, "el2n_hard": 4 * 600}[sel]
        assert rec["examples"] == probes
        assert [r["train_examples"] for r in _rows(wd, label)] == [0, 100 + probes]
    # random is today's stratified draw, unchanged.
    pick = rng.fold(rng.seed_key(0), rng.SUBSET, rng.SUBSET_PICK)
    want = stratified_indices(y, 20, num_classes=10,
                              seed=int(jax.random.randint(pick, (), 0, 2**31 - 1)))
    assert chosen["random"] == set(want.tolist())
    assert chosen["el2n_easy"].isdisjoint(chosen["el2n_hard"])  # opposite ends of each class
    assert len({frozenset(s) for s in chosen.values()}) == len(chosen)


def test_forgetting_selection_is_the_probe_s_most_forgotten(config, tmp_path):
    c = config
    c.prune.method = "subset:n=20;select=forgetting"
    wd = str(tmp_path / "wd")
    experiment.run(c, wd)
    setup = _setup(c)
    key = rng.fold(rng.seed_key(0), rng.SUBSET, rng.SUBSET_CORESET, 0)  # probe number 0
    _, flags, _ = subset.train_probe(setup, key, subset.probe_epochs(setup))
    y = np.asarray(setup.y_train)
    want = coresets.per_class(y, 2, 10, lambda idx, k: coresets.most_forgotten(flags[:, idx], k))
    assert _record(wd, "subset_n20_forgetting")["indices"] == want.tolist()


def test_probe_flags_are_the_forward_pass_each_step_trains_on(config):
    setup = _setup(config)
    key = jax.random.key(7)
    trained, flags, examples = subset.train_probe(setup, key, 2)
    assert flags.shape == (2, 200) and examples == 2 * 5 * 40
    assert set(np.unique(flags)) <= {0, 1} and np.all(flags != coresets.NOT_PRESENTED)
    # Step 0 presents the first 40 of epoch 0's permutation to the untrained init.
    init = setup.init_fn(jax.random.fold_in(key, 0))
    order = np.asarray(jax.random.permutation(
        jax.random.fold_in(jax.random.fold_in(key, 1), 0), 200))[:40]
    logits = setup.model.apply(init, setup.x_train[order], train=True)
    want = np.argmax(np.asarray(logits), -1) == np.asarray(setup.y_train)[order]
    np.testing.assert_array_equal(flags[0, order], want.astype(np.int8))
    acc = setup.trainer.evaluate(trained["params"], trained["batch_stats"],
                                 masks.ones_like(trained["params"]), setup.x_train, setup.y_train)
    assert acc["accuracy"] > 0.5  # the probe did learn: its features and flags mean something


def test_probe_epochs_are_a_tenth_of_training_and_at_least_two():
    class S:
        def __init__(self, epochs):
            self.num_steps, self.trainer = epochs * 7, type("T", (), {"steps_per_epoch": 7})
    assert [subset.probe_epochs(S(e)) for e in (1, 10, 20, 30, 60, 200)] == [2, 2, 2, 3, 6, 20]


def test_selection_is_read_back_and_not_made_again(config, tmp_path, monkeypatch):
    c = config
    c.distill.path = make_distilled(c, str(tmp_path / "syn.npz"), per_class=3)
    c.dp.batch_size = 30
    c.prune.method = "dp,subset:n=20;select=el2n_easy"
    wd = str(tmp_path / "wd")
    experiment.run(c, wd)
    path = os.path.join(wd, "runs", "subset_n20_el2n_easy-seed0", subset.INDICES)
    first = open(path).read()

    def no_probe(*a, **k):
        raise AssertionError("the probes were trained again")
    monkeypatch.setattr(subset, "train_probe", no_probe)
    c.prune.rounds = 2  # the same workdir, extended by a round
    experiment.run(c, wd)
    assert open(path).read() == first
    rows = _rows(wd, "subset_n20_el2n_easy")
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[2]["train_examples"] - rows[1]["train_examples"] == 10 * 20
    # The cost table says why the subset's rounds are cheaper than DP's (20 < dp.batch_size).
    report = open(os.path.join(wd, "report.md")).read()
    assert "fewer examples than DP" in report
    assert "Real subset, el2n_easy (n=20) 200, Distilled Pruning 300" in report


def test_a_damaged_selection_is_made_again(config, tmp_path):
    c = config
    c.prune.method = "subset:n=20;select=kcenter"
    wd = str(tmp_path / "wd")
    experiment.run(c, wd)
    path = os.path.join(wd, "runs", "subset_n20_kcenter-seed0", subset.INDICES)
    good = json.load(open(path))
    json.dump(dict(good, indices=list(range(20))), open(path, "w"))
    c.prune.rounds = 2
    with pytest.warns(RuntimeWarning, match="damaged.*selecting the subset again"):
        experiment.run(c, wd)
    assert json.load(open(path)) == good


def test_labels_and_names():
    cfg = load_config_module("fashion_mnist").get_config()
    specs = methods.parse("subset:n=100,subset:n=40;select=random,subset:n=100;select=herding,"
                          "subset:select=el2n_hard", cfg)
    assert [s.label for s in specs] == ["subset_n100", "subset_n40", "subset_n100_herding",
                                        "subset_el2n_hard"]
    assert specs[1].options == (("n", 40),)  # select=random is the plain run
    assert [methods.pretty(s.label) for s in specs] == [
        "Random real subset (n=100)", "Random real subset (n=40)",
        "Real subset, herding (n=100)", "Real subset, el2n_hard"]


@pytest.mark.parametrize("entry,match", [
    ("subset:n=20;select=greedy", r"select must be one of random, herding, kcenter, forgetting, "
                                  r"el2n_easy, el2n_hard, got 'greedy'"),
    ("subset:n=25;select=herding", r"subset:n=25;select=herding is invalid; allowed: a multiple "
                                   r"of the 10 classes"),
])
def test_bad_selections_fail_before_any_work(config, tmp_path, entry, match):
    config.prune.method = entry
    wd = tmp_path / "wd"
    with pytest.raises(ValueError, match=match):
        experiment.run(config, str(wd))
    assert not wd.exists()


def test_random_subsets_need_no_multiple_of_the_classes(config):
    spec = methods.parse("subset:n=25", config)[0]
    methods.get("subset").validate_with_data(spec, config, 200, 10)  # no error
