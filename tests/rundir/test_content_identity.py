"""Files named by path (an ``npz:`` data file, ``distill.path``) enter the run identity by the
SHA-256 of their content: a file replaced under the same name is refused like a changed setting
(dp_jax/data/registry.py file_sha256 and its cache, dp_jax/rundir/paths.py CONTENT)."""

import json
import os

import numpy as np
import pytest

from conftest import make_distilled, make_npz
from dp_jax.config import defaults
from dp_jax.data import registry as data_registry
from dp_jax.pruning import rounds as prune_lib
from dp_jax.rundir import paths
from dp_jax.storage import fileio
from dp_jax.tasks import prune as experiment


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Each test has its own fingerprint cache."""
    path = str(tmp_path / "cache" / "fingerprints.json")
    monkeypatch.setenv(data_registry.CACHE_ENV, path)
    return path


def _sha(path):
    import hashlib
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# ---- the cached file fingerprint -------------------------------------------------------------

def test_a_cached_fingerprint_is_reused_only_while_the_file_is_unchanged(tmp_path, cache):
    """A hit needs size, mtime, ctime and inode unchanged: rewriting the file with the same
    size and its old mtime put back (touch -r) is hashed again."""
    f = tmp_path / "data.bin"
    f.write_bytes(b"a" * 1000)
    assert data_registry.file_sha256(str(f)) == _sha(f)
    entry = json.load(open(cache))[os.path.realpath(f)]
    # The cache is what answers while the stamp matches (a planted digest comes back).
    json.dump({os.path.realpath(f): dict(entry, sha256="planted")}, open(cache, "w"))
    assert data_registry.file_sha256(str(f)) == "planted"
    st = os.stat(f)
    with open(f, "r+b") as fh:  # same inode, same size, new bytes
        fh.write(b"b" * 1000)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(f).st_mtime_ns == st.st_mtime_ns and os.stat(f).st_size == st.st_size
    assert data_registry.file_sha256(str(f)) == _sha(f) != entry["sha256"]
    # Replaced by another file (a new inode) under the same name.
    other = tmp_path / "other.bin"
    other.write_bytes(b"c" * 1000)
    os.replace(other, f)
    assert data_registry.file_sha256(str(f)) == _sha(f)


@pytest.mark.parametrize("content", ["", "not json", "[1, 2]", '{"x": 3}', '{"%s": [1]}'])
def test_a_corrupt_cache_is_ignored_and_rewritten(tmp_path, cache, content):
    f = tmp_path / "data.bin"
    f.write_bytes(b"xyz")
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    with open(cache, "w") as fh:
        fh.write(content.replace("%s", os.path.realpath(f)))
    assert data_registry.file_sha256(str(f)) == _sha(f)
    assert json.load(open(cache))[os.path.realpath(f)]["sha256"] == _sha(f)


def test_an_unwritable_or_disabled_cache_only_costs_a_rehash(tmp_path, monkeypatch):
    f = tmp_path / "data.bin"
    f.write_bytes(b"xyz")
    blocker = tmp_path / "file"
    blocker.write_text("")  # a file where the cache directory would be
    monkeypatch.setenv(data_registry.CACHE_ENV, str(blocker / "fingerprints.json"))
    assert data_registry.file_sha256(str(f)) == _sha(f)
    monkeypatch.setenv(data_registry.CACHE_ENV, "off")
    assert data_registry.fingerprint_cache_path() is None
    assert data_registry.file_sha256(str(f)) == _sha(f)


def test_the_npz_source_names_its_file_and_others_none(tmp_path):
    from dp_jax.data.spec import DataSpec
    path = make_npz(tmp_path / "d.npz", n_train=20, n_test=10)
    spec = DataSpec.from_config({"name": f"npz:{path}"})
    assert data_registry.content_fingerprint(spec) == _sha(path)
    assert data_registry.content_fingerprint(DataSpec.from_config({"name": "tfds:mnist"})) is None


# ---- the identity rules for content hashes ---------------------------------------------------

def _config(content=None):
    c = defaults.base_config().to_dict()
    if content is not None:
        c[paths.CONTENT] = content
    return c


def _workdir(tmp_path, config):
    wd = tmp_path / "wd"
    os.makedirs(wd / "runs" / "imp_k0-seed0")
    (wd / "runs" / "imp_k0-seed0" / "rounds.jsonl").write_text("{}\n")  # a result
    (wd / "config.json").write_text(json.dumps(config))
    return str(wd)


def test_a_changed_content_hash_is_refused_like_a_setting(tmp_path):
    wd = _workdir(tmp_path, _config({"data": {"name": "a" * 64}}))
    with pytest.raises(ValueError) as e:
        paths.check_identity(wd, _config({"data": {"name": "b" * 64}}))
    assert f"  data.name.sha256: {'a' * 64!r} -> {'b' * 64!r}\n" in str(e.value)
    assert "--restart_changed" in str(e.value)
    assert paths.check_identity(wd, _config({"data": {"name": "b" * 64}}), restart=True) == {
        "data.name.sha256": ("a" * 64, "b" * 64)}


def test_a_workdir_older_than_content_hashes_resumes(tmp_path):
    """config.json and identity.json without the hash (made before it existed) are accepted."""
    wd = _workdir(tmp_path, _config())
    new = _config({"data": {"name": "b" * 64}, "distill": {"path": "c" * 64}})
    assert paths.check_identity(wd, new) == {}
    fields = paths.run_fields(new, "imp_k0", 0, small_set=False)
    assert fields["data.name.sha256"] == "b" * 64 and "distill.path.sha256" not in fields
    old = {k: v for k, v in fields.items() if not k.endswith(paths.CONTENT_SUFFIX)}
    fileio.write_json(paths.identity_path(wd, "imp_k0", 0), old)
    paths.check_run_identity(wd, "imp_k0", 0, fields)
    dp = paths.run_fields(new, "dp", 0, small_set=True)
    assert dp["distill.path.sha256"] == "c" * 64  # only runs reading distill.* record it


# ---- end to end: a replaced file between a kill and the resume --------------------------------

class Killed(BaseException):
    """Stands for a kill: no ``except Exception`` in the code under test catches it."""


def _kill_after_round(monkeypatch, label, rnd):
    """The next run raises (as a kill would stop it) once ``label`` finished round ``rnd``."""
    real = prune_lib.finish_round

    def finish(run, r, *a, **k):
        real(run, r, *a, **k)
        if run.spec.label == label and r == rnd:
            raise Killed(f"killed after {label} round {rnd}")
    monkeypatch.setattr(prune_lib, "finish_round", finish)


def test_a_data_file_replaced_between_kill_and_resume_is_refused(tiny_config, tmp_path,
                                                                 monkeypatch):
    c = tiny_config
    data = make_npz(tmp_path / "data.npz", seed=0)
    c.data.name = f"npz:{data}"
    c.prune.method = "imp"
    c.prune.rounds = 2
    wd = str(tmp_path / "wd")
    _kill_after_round(monkeypatch, "imp_k0", 1)
    with pytest.raises(Killed):
        experiment.run(c, wd)
    monkeypatch.undo()
    before = open(paths.config_path(wd)).read()
    st = os.stat(data)
    make_npz(data, seed=1)  # other images, same size, same name ...
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))  # ... and the old mtime
    with pytest.raises(ValueError, match=r"holds results of other settings(.|\n)*"
                       r"  data.name.sha256: '[0-9a-f]{64}' -> '[0-9a-f]{64}'"):
        experiment.run(c, wd)
    assert open(paths.config_path(wd)).read() == before
    # --restart_changed moves every run aside (the data feeds them all) and equals a fresh run.
    experiment.run(c, wd, restart_changed=True)
    (old,) = os.listdir(os.path.join(wd, paths.SUPERSEDED))
    assert sorted(os.listdir(os.path.join(wd, paths.SUPERSEDED, old, "runs"))) == [
        "dense-seed0", "imp_k0-seed0"]
    fresh = str(tmp_path / "fresh")
    experiment.run(c, fresh)
    for rnd in range(3):
        a = np.load(paths.mask_path(wd, "imp_k0", 0, rnd))
        b = np.load(paths.mask_path(fresh, "imp_k0", 0, rnd))
        assert all(np.array_equal(a[k], b[k]) for k in a.files)
    assert fileio.read_json(paths.config_path(wd))[paths.CONTENT] == {"data": {"name": _sha(data)}}


def test_a_replaced_distilled_set_is_refused_and_restarts_only_small_set_runs(tiny_config,
                                                                             tmp_path):
    c = tiny_config
    c.prune.method = "imp,dp"
    c.prune.rounds = 1
    c.dp.steps = 5
    c.distill.path = make_distilled(c, str(tmp_path / "set.npz"), per_class=2)
    wd = str(tmp_path / "wd")
    experiment.run(c, wd)
    assert fileio.read_json(paths.identity_path(wd, "dp", 0))["distill.path.sha256"] == \
        _sha(c.distill.path)
    imp = open(paths.mask_path(wd, "imp_k0", 0, 1), "rb").read()
    make_distilled(c, c.distill.path, per_class=1)  # another set under the same name
    with pytest.raises(ValueError, match=r"  distill.path.sha256: '[0-9a-f]{64}' -> "):
        experiment.run(c, wd)
    experiment.run(c, wd, restart_changed=True)
    (old,) = os.listdir(os.path.join(wd, paths.SUPERSEDED))
    assert os.listdir(os.path.join(wd, paths.SUPERSEDED, old, "runs")) == ["dp-seed0"]
    assert open(paths.mask_path(wd, "imp_k0", 0, 1), "rb").read() == imp


def test_a_missing_or_foreign_distilled_set_is_refused_before_anything_is_written(
        tiny_config, tmp_path):
    c = tiny_config
    c.prune.method = "dp"
    c.prune.rounds = 1
    c.distill.path = str(tmp_path / "nowhere.npz")
    wd = tmp_path / "wd"
    with pytest.raises(ValueError, match=r"config.distill.path=.*nowhere.npz.*no such file"):
        experiment.run(c, str(wd))
    assert not wd.exists()
    other = tmp_path / "other.npz"
    np.savez(other, x=np.zeros(3))
    c.distill.path = str(other)
    with pytest.raises(ValueError, match=r"config.distill.path=.*other.npz.*lacks keys"):
        experiment.run(c, str(wd))
    assert not wd.exists()
