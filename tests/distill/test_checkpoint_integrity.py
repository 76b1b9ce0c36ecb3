"""Checksums of the distillation's checkpoints and expert trajectories: a damaged, edited or
unrecorded file found when a stopped distillation is rerun is discarded with a warning and
recomputed from its source, and the result equals an undamaged run's."""

import json
import os
import re
import shutil

import numpy as np
import pytest

from dp_jax.data import load_dataset
from dp_jax.distill import experts
from dp_jax.storage import integrity
from dp_jax.tasks.distill import distill_into

from conftest import load_config_module


class Killed(RuntimeError):
    pass


def _config(npz, buffer_dir):
    """MTT on LeNet-300-100: 6 iterations, checkpoints at 2, 4 and 6 (the last two kept)."""
    cfg = load_config_module("distill_fashion_mnist").get_config("smoke")
    cfg.data.name = f"npz:{npz}"
    cfg.model.name = "lenet_300_100"
    for f in ("width", "depth", "norm"):
        cfg.model[f] = None
    cfg.distill.iterations = 6
    cfg.distill.checkpoint_every = 2
    cfg.distill.eval_every = 0
    cfg.distill.buffer_dir = buffer_dir
    return cfg


def _logger(workdir, kill_at=None):
    def log(**row):
        with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        if kill_at is not None and row.get("iteration") == kill_at:
            raise Killed(f"killed at iteration {kill_at}")
    return log


def _distill_rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k != "wall_s"}
                for line in f if '"distill"' in line]


def _flip(path, offset=None):
    raw = bytearray(open(path, "rb").read())
    raw[len(raw) // 2 if offset is None else offset] ^= 0x10
    open(path, "wb").write(bytes(raw))


def _step_files(workdir, step):
    d = os.path.join(workdir, "checkpoints", "distill", str(step))
    return [os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs]


def _largest(workdir, step):
    """The step's biggest file: the array data (bytes of the synthetic images)."""
    return max(_step_files(workdir, step), key=os.path.getsize)


@pytest.fixture(scope="module")
def straight(tiny_npz, tmp_path_factory):
    """An undamaged, uninterrupted distillation (and its expert buffer)."""
    workdir = str(tmp_path_factory.mktemp("straight"))
    cfg = _config(tiny_npz, os.path.join(workdir, "experts"))
    dataset = load_dataset(cfg.data, seed=cfg.seed)
    ds = distill_into(cfg, workdir, dataset, log=_logger(workdir))
    return cfg, dataset, ds, workdir


def _stopped(straight, workdir, buffer_dir=None):
    """A distillation killed during iteration 5 (after the checkpoint of iteration 4)."""
    cfg, dataset, _, ref = straight
    os.makedirs(workdir)
    cfg = _config(cfg.data.name[len("npz:"):], buffer_dir or os.path.join(ref, "experts"))
    with pytest.raises(Killed):
        distill_into(cfg, workdir, dataset, log=_logger(workdir, kill_at=5))
    assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints", "distill"))
                  if s.isdigit()) == [2, 4]
    return cfg


def _rerun_equals_straight(straight, cfg, workdir, warns):
    _, dataset, a, ref = straight
    with pytest.warns(RuntimeWarning) as got:
        b = distill_into(cfg, workdir, dataset, log=_logger(workdir))
    messages = [str(w.message) for w in got if issubclass(w.category, RuntimeWarning)]
    for pattern in warns:
        assert any(re.search(pattern, m) for m in messages), (pattern, messages)
    assert all("\n" not in m for m in messages)
    np.testing.assert_array_equal(a.stored_images, b.stored_images)
    np.testing.assert_array_equal(a.images, b.images)
    assert a.lr == b.lr
    assert _distill_rows(ref) == _distill_rows(workdir)
    # The manifest vouches for the kept checkpoints only (the others were removed).
    with open(os.path.join(workdir, integrity.MANIFEST)) as f:
        recorded = sorted(k for k in json.load(f) if k.startswith("checkpoints/"))
    assert recorded == ["checkpoints/distill/4", "checkpoints/distill/6"]
    for step in (4, 6):
        assert integrity.problem(workdir, f"checkpoints/distill/{step}") is None


def _damage_latest(workdir):
    _flip(_largest(workdir, 4))


def _damage_both(workdir):
    _flip(_largest(workdir, 4))
    _flip(_largest(workdir, 2))


def _edit_payload(workdir):
    """The JSON payload of step 4 says iteration 3: digest catches it, not a silent mis-resume."""
    path = next(p for p in _step_files(workdir, 4)
                if os.sep + "payload" + os.sep in p and open(p, "rb").read(1) == b"{")
    text = open(path).read()
    assert '"iteration": 4' in text
    open(path, "w").write(text.replace('"iteration": 4', '"iteration": 3'))


def _unrecorded(workdir):
    """As after a kill between the checkpoint's commit and its record."""
    integrity.forget(workdir, "checkpoints/distill/4")


def _legacy_truncated(workdir):
    """No manifest (a workdir made before checksums): a checkpoint the reader cannot restore
    is still discarded, not fatal."""
    os.remove(os.path.join(workdir, integrity.MANIFEST))
    for path in _step_files(workdir, 4):
        if os.sep + "arrays" + os.sep in path:
            open(path, "wb").close()


CHECKPOINT_CASES = {
    "bit flip in the latest": (_damage_latest, [r"distill/4 is damaged.*from iteration 2"]),
    "bit flips in both kept": (_damage_both, [r"distill/4 is damaged.*from iteration 2",
                                              r"distill/2 is damaged.*from the start"]),
    "payload edited": (_edit_payload, [r"distill/4 is damaged"]),
    "written, never recorded": (_unrecorded, [r"distill/4 is not recorded.*from iteration 2"]),
    "unreadable, no manifest": (_legacy_truncated, [r"distill/4 is unreadable \(\w+\); discarded, recomputing from iteration 2"]),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_damaged_checkpoint_is_discarded_and_recomputed(straight, tmp_path, case):
    damage, warns = CHECKPOINT_CASES[case]
    workdir = str(tmp_path / "wd")
    cfg = _stopped(straight, workdir)
    damage(workdir)
    _rerun_equals_straight(straight, cfg, workdir, warns)


def _expert_files(buf_dir):
    out = {}
    for r, _, fs in os.walk(buf_dir):
        for f in fs:
            if f.startswith("epoch_"):
                with np.load(os.path.join(r, f)) as z:
                    out[os.path.relpath(os.path.join(r, f), buf_dir)] = {k: z[k] for k in z.files}
    return out


def _same_buffer(a, b):
    fa, fb = _expert_files(a), _expert_files(b)
    assert sorted(fa) == sorted(fb)
    for name in fa:
        assert sorted(fa[name]) == sorted(fb[name])
        for k in fa[name]:
            np.testing.assert_array_equal(fa[name][k], fb[name][k])


EXPERT_CASES = {
    "bit flip in an epoch file": (lambda p: _flip(p), "is damaged"),
    "epoch file missing": (os.remove, "is missing"),
    "epoch file never recorded": (None, "is not recorded"),
    "epoch file truncated": (lambda p: open(p, "r+b").truncate(100), "is damaged"),
}


@pytest.mark.parametrize("case", list(EXPERT_CASES))
def test_damaged_expert_file_is_retrained(straight, tmp_path, case):
    """The damage is found between a stop and a rerun of the distillation; the expert is
    retrained from its init, to the same weights, and the distillation ends as undamaged."""
    damage, why = EXPERT_CASES[case]
    ref_buf = os.path.join(straight[3], "experts")
    buf = str(tmp_path / "experts")
    shutil.copytree(ref_buf, buf)
    workdir = str(tmp_path / "wd")
    cfg = _stopped(straight, workdir, buffer_dir=buf)
    path = os.path.join(buf, "expert_001", "epoch_0002.npz")
    if damage is None:
        integrity.forget(buf, os.path.relpath(path, buf))
    else:
        damage(path)
    _damage_latest(workdir)  # and the checkpoint too: both are recomputed
    _rerun_equals_straight(straight, cfg, workdir, [
        rf"expert file {path} {why}.*retraining expert 1 from its init",
        r"distill/4 is damaged.*from iteration 2"])
    _same_buffer(ref_buf, buf)


def test_damaged_expert_file_without_retraining_is_refused(straight, tmp_path):
    """Loading trajectories alone (nothing to retrain them) names the damaged file."""
    cfg, dataset, _, ref = straight
    buf = str(tmp_path / "experts")
    shutil.copytree(os.path.join(ref, "experts"), buf)
    path = os.path.join(buf, "expert_000", "epoch_0001.npz")
    _flip(path)
    with pytest.raises(ValueError, match=r"^expert file .*expert_000/epoch_0001\.npz is "
                                         r"damaged \(checksum mismatch\);[^\n]*$"):
        experts.load_trajectories(cfg, dataset, buf)
    # train_experts repairs it, after which the same load succeeds and equals the original.
    with pytest.warns(RuntimeWarning, match="retraining expert 0"):
        experts.train_experts(cfg, dataset, buf)
    _same_buffer(os.path.join(ref, "experts"), buf)
    traj = experts.load_trajectories(cfg, dataset, buf)
    assert traj.num_experts == 2
