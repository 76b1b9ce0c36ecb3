"""End-to-end tests of the 'distill' task: run() smoke, resume after a kill, ensure_distilled,
config validation."""

import glob
import json
import os

import ml_collections
import numpy as np
import pytest

from dp_jax import distill
from dp_jax.data import load_dataset
from dp_jax.distill import config as config_lib
from dp_jax.tasks import distill as distill_task
from dp_jax.tasks import settings as settings_lib
from dp_jax.tasks.distill import distill_into

from conftest import load_config_module

def _get_config(variant="smoke"):
    return load_config_module("distill_fashion_mnist").get_config(variant)


@pytest.fixture(scope="module")
def smoke_run(tiny_npz, tmp_path_factory):
    """The real entry function on the smoke config (ConvNet, python-driven student)."""
    cfg = _get_config("smoke")
    cfg.data.name = f"npz:{tiny_npz}"
    workdir = str(tmp_path_factory.mktemp("run"))
    summary = distill_task.run(cfg, workdir)
    return cfg, workdir, summary


def test_run_writes_the_contract(smoke_run):
    cfg, workdir, summary = smoke_run
    for name in ("config.json", "metrics.jsonl", "distilled.npz", "distilled.png", "summary.json",
                 "report.md"):
        assert os.path.isfile(os.path.join(workdir, name)), name
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "distill"))
    with open(os.path.join(workdir, "summary.json")) as f:
        on_disk = json.load(f)
    assert on_disk["task"] == "distill" and set(on_disk["results"]) == {"distilled", "random",
                                                                        "full"}
    for r in summary["results"].values():
        assert 0.0 <= r["accuracy_mean"] <= 1.0
    cost = summary["cost"]
    assert set(cost) == {"expert_examples", "expert_wall_s", "expert_cpu_s", "distill_examples",
                         "distill_wall_s", "distill_cpu_s"}
    for phase in ("expert", "distill"):  # CPU seconds of all threads: > 0, <= cores x wall
        assert 0 < cost[f"{phase}_cpu_s"] <= (os.cpu_count() or 1) * cost[f"{phase}_wall_s"] + 1
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    phases = {r["phase"] for r in rows}
    assert {"experts", "distill", "distill_eval", "final_eval"} <= phases
    its = [r["iteration"] for r in rows if r["phase"] == "distill"]
    assert its == list(range(1, cfg.distill.iterations + 1))
    assert all(np.isfinite(r["loss"]) and r["lr"] > 0 for r in rows if r["phase"] == "distill")
    ds = distill.load_distilled(os.path.join(workdir, "distilled.npz"))
    assert ds.images.shape == (cfg.distill.ipc * 3, 8, 8, 1)
    assert sorted(np.bincount(ds.labels)) == [cfg.distill.ipc] * 3
    assert ds.cost["distill_examples"] == cfg.distill.iterations * cfg.distill.syn_steps * 6
    with open(os.path.join(workdir, "report.md")) as f:
        text = f.read()
    assert "random real subset" in text and "plots/distillation_loss.png" in text
    assert os.path.isfile(os.path.join(workdir, "plots", "distillation_loss.png"))
    assert on_disk["data_source"] == "npz:" + os.path.abspath(cfg.data.name[len("npz:"):])
    assert glob.glob(os.path.join(workdir, "tb", "distill", "events.out.tfevents.*"))
    assert len(glob.glob(os.path.join(workdir, "tb", "experts", "expert_*"))) == \
        cfg.distill.num_experts


def test_ensure_distilled_precedence(smoke_run, tiny_npz, tmp_path):
    cfg, workdir, _ = smoke_run
    dataset = load_dataset(cfg.data, seed=cfg.seed)
    # An existing <workdir>/distilled.npz is loaded, not recomputed.
    ds = distill_task.ensure_distilled(cfg, workdir, dataset)
    assert ds.cost["distill_examples"] > 0
    # distill.path wins over the workdir.
    cfg2 = ml_collections.ConfigDict(cfg.to_dict())
    cfg2.distill.path = os.path.join(workdir, "distilled.npz")
    ds2 = distill_task.ensure_distilled(cfg2, str(tmp_path), dataset)
    np.testing.assert_array_equal(ds.images, ds2.images)
    assert not os.path.exists(tmp_path / "distilled.npz")
    # ... and is checked against the dataset's preprocessing.
    other = ml_collections.ConfigDict(cfg2.to_dict())
    other.data.preprocess = "none"
    with pytest.raises(ValueError, match="different preprocessing"):
        distill_task.ensure_distilled(other, str(tmp_path), load_dataset(other.data, seed=0))


def _mlp_config(npz, iterations, buffer_dir):
    cfg = _get_config("smoke")
    cfg.data.name = f"npz:{npz}"
    cfg.model.name = "lenet_300_100"
    for f in ("width", "depth", "norm"):
        cfg.model[f] = None
    d = cfg.distill
    d.iterations = iterations
    d.checkpoint_every = 2
    d.eval_every = 0
    d.buffer_dir = buffer_dir
    d.factor = 2  # also exercises multi-formation through the loop
    return cfg


def test_multi_formation_is_also_compared_at_equal_storage(tiny_npz, tmp_path, monkeypatch):
    """factor 2: 3 stored images decode into 12; the random baseline runs at both sizes."""
    from dp_jax.distill import evaluate
    cfg = _mlp_config(tiny_npz, 2, str(tmp_path / "experts"))
    cfg.distill.ipc = 1
    cfg.distill.eval_full_epochs = 0
    sizes, subset = [], evaluate.random_subset
    monkeypatch.setattr(evaluate, "random_subset",
                        lambda ds, size, seed: sizes.append(size) or subset(ds, size, seed=seed))
    summary = distill_task.run(cfg, str(tmp_path / "wd"))
    assert sizes == [12, 3]
    r = summary["results"]
    assert set(r) == {"distilled", "random", "random_stored"}
    assert summary["images"] == 12 and summary["stored_images"] == 3
    rows = [json.loads(line) for line in open(tmp_path / "wd" / "metrics.jsonl")]
    assert {row["set"] for row in rows if row["phase"] == "final_eval"} == set(r)
    assert "same storage | 3 |" in open(tmp_path / "wd" / "report.md").read()


class Killed(RuntimeError):
    pass


def test_resume_after_kill_is_identical(tiny_npz, tmp_path):
    buf = str(tmp_path / "experts")
    cfg = _mlp_config(tiny_npz, 6, buf)
    dataset = load_dataset(cfg.data, seed=cfg.seed)

    def logger(path, kill_at=None):
        def log(**row):
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")
            if kill_at is not None and row.get("iteration") == kill_at:
                raise Killed(f"killed at iteration {kill_at}")
        return log

    straight_dir = tmp_path / "straight"
    straight_dir.mkdir()
    a = distill_into(cfg, str(straight_dir), dataset,
                     log=logger(straight_dir / "metrics.jsonl"))
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    with pytest.raises(Killed):  # dies after the checkpoint of iteration 4, during iteration 5
        distill_into(cfg, str(resumed_dir), dataset, log=logger(resumed_dir / "metrics.jsonl", 5))
    b = distill_into(cfg, str(resumed_dir), dataset, log=logger(resumed_dir / "metrics.jsonl"))
    np.testing.assert_array_equal(a.stored_images, b.stored_images)
    np.testing.assert_array_equal(a.images, b.images)
    assert a.lr == b.lr and a.images.shape[0] == 4 * b.stored_images.shape[0]

    def rows(d):
        with open(d / "metrics.jsonl") as f:
            return [{k: v for k, v in json.loads(line).items() if k != "wall_s"}
                    for line in f if '"distill"' in line]
    assert rows(straight_dir) == rows(resumed_dir)
    assert len(rows(straight_dir)) == 6


def test_config_variants_and_validation(tiny_npz):
    for v in ("", "lenet", "zca", "smoke", "lenet,zca"):
        c = _get_config(v)
        assert c.task == "distill"
        settings_lib.parse(c)
    with pytest.raises(ValueError, match="allowed: lenet, zca, smoke"):
        _get_config("bigger")

    def bad(**kw):
        c = _get_config("smoke")
        for k, v in kw.items():
            c.distill[k] = v
        return c
    cases = [(dict(memory="tesla"), r"distill.memory='tesla' is invalid; allowed: unroll \| "
                                    r"remat \| constant"),
             (dict(loop="gpu"), "distill.loop"),
             (dict(expert_train_epochs=2), r"expert_train_epochs=2 is invalid; allowed: >= "),
             (dict(syn_steps=0), "distill.syn_steps"),
             (dict(lr_img=-1.0), "distill.lr_img"),
             (dict(momentum_img=1.0), "distill.momentum_img"),
             (dict(init="zeros"), "distill.init"),
             (dict(dsa_strategy="color_blur"), "distill.dsa_strategy"),
             (dict(expert_augment="mixup"), "distill.expert_augment")]
    for kw, match in cases:
        with pytest.raises(ValueError, match=match):
            settings_lib.parse(bad(**kw))
    c = _get_config("smoke")
    c.distill.unknown_field = 1
    with pytest.raises(ValueError, match="config.distill has no field 'unknown_field'; valid: "):
        settings_lib.parse(c)
    c = bad(batch_syn=100)
    c.data.name = f"npz:{tiny_npz}"
    ds = load_dataset(c.data, seed=0)
    with pytest.raises(ValueError, match="distill.batch_syn=100 is invalid"):
        config_lib.validate_with_data(settings_lib.parse(c).distill, ds)
    c = bad(factor=3)
    with pytest.raises(ValueError, match="distill.factor=3"):
        config_lib.validate_with_data(settings_lib.parse(c).distill, ds)
