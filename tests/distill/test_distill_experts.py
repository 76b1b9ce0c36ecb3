"""Tests for dp_jax.distill.experts: resumable buffers, provenance checks, epoch checks."""


import numpy as np
import pytest

from dp_jax.data import load_dataset
from dp_jax.distill import experts

from conftest import load_config_module

def _get_config(variant="smoke"):
    return load_config_module("distill_fashion_mnist").get_config(variant)


def _config(npz, **distill):
    c = _get_config()
    c.data.name = f"npz:{npz}"
    c.model.name = "lenet_300_100"
    for f in ("width", "depth", "norm"):
        c.model[f] = None
    for k, v in distill.items():
        c.distill[k] = v
    return c


def _arrays(buf, i, t):
    with np.load(buf.epoch_path(i, t)) as z:
        return {k: z[k] for k in z.files}


def test_resume_and_extend_equal_straight_training(tiny_npz, tmp_path):
    cfg = _config(tiny_npz, num_experts=2, expert_train_epochs=3)
    ds = load_dataset(cfg.data, seed=cfg.seed)
    straight = experts.train_experts(cfg, ds, str(tmp_path / "a"))
    # A buffer grown in steps (as after kills, or a later request for more): 1x1, then 2x3.
    part = _config(tiny_npz, num_experts=1, expert_train_epochs=1, max_start_epoch=1,
                   expert_epochs=1)
    rows = []
    experts.train_experts(part, ds, str(tmp_path / "b"), log=lambda **kw: rows.append(kw))
    assert [r["epoch"] for r in rows] == [1]
    grown = experts.train_experts(cfg, ds, str(tmp_path / "b"))
    for i in range(2):
        assert grown.epochs_done(i) == 3
        for t in range(4):
            a, b = _arrays(straight, i, t), _arrays(grown, i, t)
            assert sorted(a) == sorted(b)
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])
    # Different experts start differently; trained weights move.
    a0, a1 = _arrays(straight, 0, 0), _arrays(straight, 1, 0)
    assert not np.array_equal(a0["params/fc1/kernel"], a1["params/fc1/kernel"])
    assert not np.array_equal(a0["params/fc1/kernel"], _arrays(straight, 0, 3)["params/fc1/kernel"])
    cost = straight.cost()
    assert cost["examples"] == 2 * 3 * (60 // 20) * 20 and cost["wall_s"] > 0
    # Trajectories in memory: (experts, epochs + 1, ...).
    traj = experts.load_trajectories(cfg, ds, str(tmp_path / "a"))
    assert traj.num_experts == 2 and traj.num_epochs == cfg.distill.max_start_epoch + 2
    params, _ = traj.get(1, 2)
    np.testing.assert_array_equal(np.asarray(params["fc1"]["kernel"]),
                                  _arrays(straight, 1, 2)["params/fc1/kernel"])


def test_provenance_mismatch_errors(tiny_npz, tmp_path):
    cfg = _config(tiny_npz, num_experts=1, expert_train_epochs=3)
    ds = load_dataset(cfg.data, seed=cfg.seed)
    experts.train_experts(cfg, ds, str(tmp_path))
    other_lr = _config(tiny_npz, num_experts=1, expert_train_epochs=3, expert_lr=0.5)
    with pytest.raises(ValueError, match=r"does not match this config: optimizer"):
        experts.train_experts(other_lr, ds, str(tmp_path))
    with pytest.raises(ValueError, match="optimizer"):
        experts.load_trajectories(other_lr, ds, str(tmp_path))
    other_model = _get_config()
    other_model.data.name = f"npz:{tiny_npz}"
    with pytest.raises(ValueError, match="model"):
        experts.load_trajectories(other_model, ds, str(tmp_path))
    zca_cfg = _config(tiny_npz, num_experts=1, expert_train_epochs=3)
    zca_cfg.data.preprocess = "none"
    zca_ds = load_dataset(zca_cfg.data, seed=0)
    with pytest.raises(ValueError, match="preprocess"):
        experts.load_trajectories(zca_cfg, zca_ds, str(tmp_path))


def test_too_few_saved_epochs(tiny_npz, tmp_path):
    cfg = _config(tiny_npz, num_experts=1, expert_train_epochs=3)
    ds = load_dataset(cfg.data, seed=cfg.seed)
    experts.train_experts(cfg, ds, str(tmp_path))
    longer = _config(tiny_npz, num_experts=1, expert_train_epochs=5, max_start_epoch=3,
                     expert_epochs=2)
    with pytest.raises(ValueError, match=r"max_start_epoch \+ distill.expert_epochs = 3 \+ 2 = 5"):
        experts.load_trajectories(longer, ds, str(tmp_path))
    more = _config(tiny_npz, num_experts=2, expert_train_epochs=3)
    with pytest.raises(ValueError, match="expert 1 has 0 saved epochs"):
        experts.load_trajectories(more, ds, str(tmp_path))


def test_damaged_expert_files_are_refused_or_retrained(tiny_npz, tmp_path):
    cfg = _config(tiny_npz, num_experts=2, expert_train_epochs=3)
    ds = load_dataset(cfg.data, seed=cfg.seed)
    buf = experts.train_experts(cfg, ds, str(tmp_path / "a"))
    ref = _arrays(buf, 1, 3)
    # A bit flip in an epoch file: loading the trajectories names the file.
    path = buf.epoch_path(0, 2)
    raw = bytearray(open(path, "rb").read())
    raw[len(raw) // 2] ^= 1
    open(path, "wb").write(bytes(raw))
    with pytest.raises(ValueError, match=r"expert_000/epoch_0002\.npz is damaged"):
        experts.load_trajectories(cfg, ds, str(tmp_path / "a"))
    # A damaged resume point (or one written but never recorded, as after a kill between the
    # two) is not trusted: that expert is retrained from its init, to the same weights.
    state = tmp_path / "a" / "expert_001" / "state.npz"
    state.write_bytes(state.read_bytes()[:-7])
    assert buf.epochs_done(1) == -1
    experts.train_experts(cfg, ds, str(tmp_path / "a"))
    again = _arrays(buf, 1, 3)
    assert sorted(again) == sorted(ref)
    for k in ref:
        np.testing.assert_array_equal(again[k], ref[k])
    assert buf.epochs_done(1) == 3
