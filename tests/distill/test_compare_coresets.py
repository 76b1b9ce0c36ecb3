"""``python -m dp_jax.distill.compare --baselines=...``: each distilled set against real subsets of
its size chosen by the coreset rules (the selections of ``subset:select=S``), trained by the set's
own evaluation, beside DC's published Table 1; the selections are cached next to the output."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from dp_jax import rng
from dp_jax.cli import distill_tools
from dp_jax.data import coresets, stratified_indices
from dp_jax.distill import evaluate as eval_lib
from dp_jax.distill import load_distilled
from dp_jax.methods import subset
from dp_jax.models import features as features_lib
from dp_jax.pruning import setup as setup_lib
from dp_jax.reports import distill_baselines as baselines
from dp_jax.reports import distill_compare as compare
from dp_jax.tasks import distill as distill_task
from dp_jax.tasks import settings as settings_lib

from conftest import ROOT, load_config_module, make_distilled

PER_CLASS = 2  # the set's images per class (10 classes of the toy data)


@pytest.fixture(scope="module")
def compared(toy_npz, tmp_path_factory):
    """A finished distillation workdir (LeNet, a 2-per-class set given by path, so only the
    evaluation runs) and ``compare`` on it with the default baselines."""
    root = tmp_path_factory.mktemp("cmp")
    cfg = load_config_module("distill_fashion_mnist").get_config("lenet,smoke")
    cfg.data.name = f"npz:{toy_npz}"
    cfg.distill.eval_full_epochs = 0
    cfg.distill.path = make_distilled(cfg, str(root / "set.npz"), per_class=PER_CLASS)
    wd = str(root / "gm_set")
    summary = distill_task.run(cfg, wd)
    out = str(root / "out")
    assert distill_tools.compare_main([wd, f"--out={out}"]) == 0
    return cfg, wd, out, summary


def _json(out):
    with open(os.path.join(out, "compare.json")) as f:
        return json.load(f)


def _settings_and_setup(wd):
    settings = settings_lib.from_workdir(wd)[0]
    return settings, setup_lib.build_setup(settings, setup_lib.load_data(settings))


def test_each_selection_is_a_row_with_the_set_size_per_class(compared):
    cfg, wd, out, _ = compared
    run = _json(out)["runs"][0]
    assert set(run["baselines"]) == set(baselines.DEFAULT_BASELINES)
    y = np.asarray(load_distilled(os.path.join(wd, "distilled.npz")).labels)
    assert np.all(np.bincount(y) == PER_CLASS)
    for name, b in run["baselines"].items():
        assert b["per_class"] == PER_CLASS and b["images"] == 10 * PER_CLASS
        assert len(b["accuracies"]) == cfg.distill.eval_models  # the set's K networks
        assert b["lr"] == cfg.distill.lr_init  # the task's real subsets' step size
        with open(os.path.join(out, b["selection"])) as f:
            assert json.load(f)["class_counts"] == [PER_CLASS] * 10
    text = open(os.path.join(out, "compare.md")).read()
    header = next(line for line in text.splitlines() if line.startswith("| set | images per"))
    assert header.split(" | ")[3:] == ["random", "herding", "kcenter", "forgetting |"]
    row = next(line for line in text.splitlines() if line.startswith("| gm_set | 2 |"))
    assert row.count("±") == 5  # distilled and the four baselines


def test_selections_equal_the_coreset_rules_on_the_same_probe(compared):
    """An independent call: subset's probe for the seed, its features and forgetting flags,
    and the pure rules of dp_jax/data/coresets.py."""
    _, wd, out, _ = compared
    settings, setup = _settings_and_setup(wd)
    seed_key = rng.seed_key(settings.seed)
    key = rng.fold(seed_key, rng.SUBSET, rng.SUBSET_CORESET, 0)  # probe number 0
    probe, flags, _ = subset.train_probe(setup, key, subset.probe_epochs(setup))
    x, y = setup.x_train, np.asarray(setup.y_train)
    B = settings.train.eval_batch_size
    feats_fn = jax.jit(lambda v, xb: features_lib.apply_features(setup.model, v, xb))
    feats = np.concatenate([np.asarray(feats_fn(probe, x[s:s + B]))
                            for s in range(0, x.shape[0], B)])
    want = {
        "herding": coresets.per_class(y, PER_CLASS, 10,
                                      lambda idx, k: coresets.herding(feats[idx], k)),
        "kcenter": coresets.per_class(y, PER_CLASS, 10,
                                      lambda idx, k: coresets.kcenter(feats[idx], k)),
        "forgetting": coresets.per_class(
            y, PER_CLASS, 10, lambda idx, k: coresets.most_forgotten(flags[:, idx], k)),
    }
    pick = rng.fold(seed_key, rng.SUBSET, rng.SUBSET_PICK)
    want["random"] = stratified_indices(y, 10 * PER_CLASS, num_classes=10,
                                        seed=int(jax.random.randint(pick, (), 0, 2**31 - 1)))
    for name, b in _json(out)["runs"][0]["baselines"].items():
        with open(os.path.join(out, b["selection"])) as f:
            assert json.load(f)["indices"] == want[name].tolist(), name
    assert len({tuple(v.tolist()) for v in want.values()}) == 4


def test_baselines_train_the_distilled_set_s_networks(compared):
    """set_eval_key is the key the distill task evaluated the set with: the same evaluator
    reproduces the set's accuracies exactly, and a baseline's, from its cached indices."""
    cfg, wd, out, summary = compared
    settings, _ = _settings_and_setup(wd)
    dataset = setup_lib.load_data(settings)
    evaluator = eval_lib.make_evaluator(settings, dataset)
    key = eval_lib.set_eval_key(settings.seed)
    ds = load_distilled(os.path.join(wd, "distilled.npz"))
    again = evaluator.run(ds.images, ds.labels, ds.lr, key, num_models=cfg.distill.eval_models)
    assert again["accuracies"] == summary["results"]["distilled"]["accuracies"]
    b = _json(out)["runs"][0]["baselines"]["herding"]
    with open(os.path.join(out, b["selection"])) as f:
        idx = json.load(f)["indices"]
    res = eval_lib.evaluate_subset(evaluator, dataset, idx, cfg.distill.lr_init, key,
                                   num_models=cfg.distill.eval_models)
    assert res["accuracies"] == b["accuracies"]


def test_the_published_table_is_beside_them_with_its_citation(compared):
    _, _, out, _ = compared
    text = open(os.path.join(out, "compare.md")).read()
    pub = baselines.DC_TABLE1_FMNIST_IPC10
    assert pub["citation"] in text
    for needle in ("Dataset Condensation with Gradient Matching", "ICLR 2021", "Table 1",
                   '"FashionMNIST, img/cls 10"', "Random", "Herding", "K-Center", "Forgetting"):
        assert needle in pub["citation"] + text, needle
    assert any(line.startswith("| published: DC Table 1, FashionMNIST | 10 |")
               for line in text.splitlines())
    assert _json(out)["published"] == json.loads(json.dumps(pub))
    # docs/distillation.md holds the same figures and citation.
    doc = open(os.path.join(ROOT, "docs", "distillation.md")).read()
    assert "Dataset Condensation with Gradient Matching" in doc and "img/cls 10" in doc
    for paper, value in pub["rows"].values():
        assert paper in doc
        if value is not None:
            assert f"{value[0]:.1f} ± {value[1]:.1f}" in doc


def test_a_rerun_reads_the_cached_selections(compared, monkeypatch, tmp_path):
    _, wd, out, _ = compared
    first = _json(out)["runs"][0]["baselines"]
    files = {n: open(os.path.join(out, b["selection"])).read() for n, b in first.items()}

    def never(*a, **k):
        raise AssertionError("a selection was made again")
    monkeypatch.setattr(subset, "train_probe", never)
    monkeypatch.setattr(subset, "random_indices", never)
    # Evaluations gone, selections kept: the networks train again on the cached indices.
    shutil.rmtree(os.path.join(out, baselines.CACHE, "evaluations"))
    assert distill_tools.compare_main([wd, f"--out={out}"]) == 0
    again = _json(out)["runs"][0]["baselines"]
    assert {n: b["accuracies"] for n, b in again.items()} == \
        {n: b["accuracies"] for n, b in first.items()}
    assert {n: open(os.path.join(out, b["selection"])).read() for n, b in again.items()} == files
    # Everything cached: no network trains either.
    monkeypatch.setattr(eval_lib.SetEvaluator, "run", never)
    assert distill_tools.compare_main([wd, f"--out={out}"]) == 0
    monkeypatch.undo()
    # A damaged selection is made again, identically.
    path = os.path.join(out, first["kcenter"]["selection"])
    rec = json.loads(files["kcenter"])
    with open(path, "w") as f:
        json.dump(dict(rec, indices=list(range(10 * PER_CLASS))), f)
    with pytest.warns(RuntimeWarning, match="damaged record; making it again"):
        compare.write([wd], out, baselines=["kcenter"],
                      settings_of=lambda w: settings_lib.from_workdir(w)[0])
    assert json.loads(open(path).read())["indices"] == rec["indices"]


@pytest.mark.parametrize("flag", ["herding,greedy", "none,random", ""])
def test_an_unknown_baseline_is_refused_before_any_work(flag, tmp_path, capsys, monkeypatch):
    def never(*a, **k):
        raise AssertionError("work started")
    monkeypatch.setattr(compare, "load_run", never)
    out = tmp_path / "out"
    rc = distill_tools.compare_main([str(tmp_path / "nowd"), f"--out={out}",
                                     f"--baselines={flag}"])
    err = capsys.readouterr().err
    assert rc == 2 and f"--baselines={flag} is invalid" in err
    assert ("allowed: none, or comma-separated names of random, herding, kcenter, forgetting, "
            "el2n_easy, el2n_hard") in err
    assert "\n" not in err.strip() and not out.exists()


def test_parse_baselines():
    assert baselines.parse_baselines("none") == ()
    assert baselines.parse_baselines(" herding, random,herding ") == ("herding", "random")
    assert baselines.parse_baselines(",".join(baselines.DEFAULT_BASELINES)) == \
        ("random", "herding", "kcenter", "forgetting")
    with pytest.raises(ValueError, match=r"unknown 'Herding'"):
        baselines.parse_baselines("Herding")


def test_none_skips_them_and_a_workdir_without_a_set_is_named(compared, tmp_path):
    _, wd, _, _ = compared
    out = str(tmp_path / "none")
    assert distill_tools.compare_main([wd, f"--out={out}", "--baselines=none"]) == 0
    assert "Real subsets" not in open(os.path.join(out, "compare.md")).read()
    assert not os.path.exists(os.path.join(out, baselines.CACHE))
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("summary.json", "config.json", "metrics.jsonl"):
        shutil.copy(os.path.join(wd, name), bare / name)
    out = str(tmp_path / "bare_out")
    assert distill_tools.compare_main([str(bare), f"--out={out}", "--baselines=random"]) == 0
    text = open(os.path.join(out, "compare.md")).read()
    assert "- bare: no distilled.npz in the workdir, baselines not evaluated" in text
