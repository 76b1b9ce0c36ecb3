"""A workdir written before the layered package resumes and extends with today's code, without
a "settings changed" refusal (tests/fixtures/workdir_v0/README.md says how it was made)."""

import hashlib
import json
import os
import shutil

from conftest import ROOT, load_config_module
from dp_jax.storage import fileio
from dp_jax.tasks import prune as experiment

FIXTURE = os.path.join(ROOT, "tests", "fixtures", "workdir_v0")
TIMINGS = ("wall_s", "mask_s", "train_s", "search_s", "compile_s")


def _config(rounds):
    c = load_config_module("fashion_mnist").get_config("smoke")
    c.data.name = "npz:toy.npz"  # relative, as the fixture was made
    c.data.train_size = 0
    c.train.batch_size = 40
    c.train.epochs = 2
    c.train.eval_batch_size = 64
    c.checkpoint.keep = "last"
    c.metrics.tensorboard = False
    c.prune.rounds = rounds
    return c


def _records(path):
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in fileio.read_jsonl(path)]


def test_old_workdir_extends_without_a_settings_refusal(tmp_path, monkeypatch):
    shutil.copytree(FIXTURE, tmp_path / "fx")
    monkeypatch.chdir(tmp_path / "fx")
    with open("wd/config.json") as f:
        old_config = json.load(f)
    before = _records("wd/rounds.jsonl")
    assert {r["round"] for r in before} == {0, 1, 2}
    summary = experiment.run(_config(rounds=3), "wd")  # one round more than the fixture has
    after = _records("wd/rounds.jsonl")
    # The finished rounds are kept as they were (not recomputed, not moved aside) ...
    assert [r for r in after if r["round"] <= 2] == before
    assert not os.path.exists("wd/superseded")
    # ... and every run gains round 3.
    assert sorted(r["method"] for r in after if r["round"] == 3) == ["imp_k0", "imp_k5", "random"]
    assert {m["rounds"] for m in summary["methods"].values()} == {3}
    # config.json is today's config: the same values but the extended schedule.
    with open("wd/config.json") as f:
        new_config = json.load(f)
    assert new_config["prune"].pop("rounds") == 3 and old_config["prune"].pop("rounds") == 2
    # data_source is where the data was read from: the absolute path of this copy's toy.npz.
    assert new_config.pop("data_source") == f"npz:{tmp_path / 'fx' / 'toy.npz'}"
    old_config.pop("data_source")
    # Fields added since the fixture was made appear at their defaults; the data file's
    # content hash, which it could not record, is recorded from this resume on.
    assert new_config["data"].pop("plugins") == new_config["model"].pop("plugins") == ""
    assert new_config["prune"].pop("evaluate") == ""
    assert new_config.pop("content_sha256") == {"data": {"name": hashlib.sha256(
        open(tmp_path / "fx" / "toy.npz", "rb").read()).hexdigest()}}
    assert new_config == old_config
