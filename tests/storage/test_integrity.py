"""Damaged, missing and unrecorded files of a workdir: detected, never used silently; every
round's checkpoint kept; a resume after repair ends identical to an undamaged run."""

import os
import shutil

import numpy as np
import pytest

from dp_jax.tasks import prune as experiment
from dp_jax.storage import fileio, integrity

from conftest import make_distilled

from dp_jax.pruning.records import TIMINGS  # noqa: E402
RUN = os.path.join("runs", "imp_k0-seed0")


def _strip(rows):
    return sorted(({k: v for k, v in r.items() if k not in TIMINGS} for r in rows),
                  key=lambda r: (r["method"], r["seed"], r["round"]))


def _masks(wd):
    out = {}
    mdir = os.path.join(wd, RUN, "masks")
    for f in sorted(os.listdir(mdir)):
        if f.endswith(".npz"):
            with np.load(os.path.join(mdir, f)) as z:
                out[f] = {k: z[k] for k in z.files}
    return out


def _same(a, b):
    assert _strip(fileio.read_jsonl(os.path.join(a, "rounds.jsonl"))) == \
        _strip(fileio.read_jsonl(os.path.join(b, "rounds.jsonl")))
    ma, mb = _masks(a), _masks(b)
    assert sorted(ma) == sorted(mb)
    for f in ma:
        assert all(np.array_equal(ma[f][k], mb[f][k]) for k in ma[f]), f


@pytest.fixture(scope="module")
def reference(tmp_path_factory, toy_npz):
    from conftest import load_config_module
    c = load_config_module("fashion_mnist").get_config("smoke")
    c.data.name = f"npz:{toy_npz}"
    c.data.train_size = 0
    c.train.batch_size = 40
    c.prune.method = "imp"
    c.prune.rounds = 3
    wd = str(tmp_path_factory.mktemp("ref") / "wd")
    experiment.run(c, wd)
    return c, wd


def _copy(reference, tmp_path):
    c, ref = reference
    wd = str(tmp_path / "wd")
    shutil.copytree(ref, wd)
    return c, ref, wd


def test_every_round_checkpoint_is_kept_and_recorded(reference):
    _, ref = reference
    assert sorted(os.listdir(os.path.join(ref, RUN, "checkpoints"))) == ["0", "1", "2", "3"]
    for rel in ["checkpoints/3", "masks/round_002.npz"]:
        assert integrity.problem(os.path.join(ref, RUN), rel) is None


def _flip_a_byte(directory):
    files = [os.path.join(r, f) for r, _, fs in os.walk(directory) for f in fs]
    big = max(files, key=os.path.getsize)
    with open(big, "r+b") as f:
        f.seek(os.path.getsize(big) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x40]))


def test_bit_flip_in_latest_checkpoint_falls_back_and_recomputes(reference, tmp_path):
    c, ref, wd = _copy(reference, tmp_path)
    _flip_a_byte(os.path.join(wd, RUN, "checkpoints", "3"))
    with pytest.warns(RuntimeWarning, match=r"checkpoints/3 is damaged.*recomputing from round 2"):
        experiment.run(c, wd)
    _same(ref, wd)


def test_unrecorded_checkpoint_counts_as_interrupted(reference, tmp_path):
    c, ref, wd = _copy(reference, tmp_path)
    integrity.forget(os.path.join(wd, RUN), "checkpoints/3")  # a kill between save and record
    with pytest.warns(RuntimeWarning, match="checkpoints/3 is not recorded"):
        experiment.run(c, wd)
    _same(ref, wd)


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_missing_or_damaged_mask_is_rewritten_from_its_checkpoint(reference, tmp_path, damage):
    c, ref, wd = _copy(reference, tmp_path)
    path = os.path.join(wd, RUN, "masks", "round_001.npz")
    if damage == "delete":
        os.unlink(path)
    else:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    with pytest.warns(RuntimeWarning, match=r"round_001.npz is (missing|damaged)"):
        experiment.run(c, wd)
    _same(ref, wd)


def test_with_keep_last_a_lost_old_mask_is_a_clear_error(reference, tmp_path):
    c, _, _ = _copy(reference, tmp_path)
    c = c.copy_and_resolve_references()
    c.checkpoint.keep = "last"
    wd = str(tmp_path / "last")
    experiment.run(c, wd)
    assert sorted(os.listdir(os.path.join(wd, RUN, "checkpoints"))) == ["2", "3"]
    os.unlink(os.path.join(wd, RUN, "masks", "round_001.npz"))
    with pytest.raises(ValueError, match="round 1's checkpoint is no longer kept"):
        experiment.run(c, wd)


def test_edited_distilled_set_in_workdir_is_refused(tiny_config, tmp_path):
    c = tiny_config
    syn = make_distilled(c, str(tmp_path / "syn.npz"))
    c.prune.method = "dp"
    c.prune.rounds = 1
    c.dp.steps = 5
    c.distill.path = syn
    # As distillation does when it writes the workdir's set: save it and record its checksum.
    import importlib
    from dp_jax import distill
    distill_run = importlib.import_module("dp_jax.tasks.distill")  # the module, not run()
    wd = tmp_path / "wd"
    ds = distill.load_distilled(syn)
    wd.mkdir()
    distill_run._save_recorded(str(wd), ds)
    c.distill.path = None
    d2 = distill.DistilledSet(ds.images + 0.5, ds.labels, ds.lr, ds.preprocessing, ds.dataset)
    distill.save_distilled(str(wd / "distilled.npz"), d2)  # edited after it was recorded
    with pytest.raises(ValueError, match="distilled.npz is damaged"):
        experiment.run(c, str(wd))


def test_outputs_get_the_mode_a_plain_open_gives(tmp_path):
    """Atomic writes (JSON, masks, reports) end with the umask's mode, not mkstemp's 0600."""
    import stat
    from dp_jax import masks as masks_lib
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    want = stat.S_IMODE(os.stat(plain).st_mode)
    fileio.write_json(str(tmp_path / "a.json"), {"a": 1})
    masks_lib.save(str(tmp_path / "m.npz"), {"w": {"kernel": np.ones((2, 2), bool)}})
    for name in ("a.json", "m.npz"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == want, name
