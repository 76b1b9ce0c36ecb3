"""Every file a workdir holds gets the mode a plain ``open()`` would give it (0o666 less the
umask; directories 0o777 less it), whoever wrote it: atomic writes (dp_jax/storage/atomic.py,
whose temporary files start at 0o600), appends, checkpoints, event files, plots, the lock."""

import os
import stat

import pytest

from conftest import make_distilled
from dp_jax.rundir import lock as rundir_lock
from dp_jax.rundir import paths
from dp_jax.storage import atomic
from dp_jax.tasks import eval_mask, export
from dp_jax.tasks import prune as experiment


@pytest.fixture
def umask():
    """A umask other than the usual 0o022 (0o007: group-writable, nothing for others)."""
    old = os.umask(0o007)
    yield 0o007
    os.umask(old)


def _modes(root):
    out = {}
    for d, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(d, name)
            out[os.path.relpath(path, root)] = stat.S_IMODE(os.lstat(path).st_mode)
    return out


def test_every_output_of_a_workdir_has_the_umasks_mode(tiny_config, tmp_path, umask):
    assert atomic.file_mode() == 0o660  # read without setting the umask
    c = tiny_config
    c.prune.method = "imp,dp"
    c.prune.rounds = 1
    c.dp.steps = 5
    c.distill.path = make_distilled(c, str(tmp_path / "set.npz"))
    wd = str(tmp_path / "wd")
    experiment.run(c, wd)
    c.dp.lr = 0.2
    experiment.run(c, wd, restart_changed=True)  # superseded/: moved and copied files
    eval_mask.evaluate_mask(c, paths.mask_path(wd, "imp_k0", 0, 1), wd)
    export.export_ticket(wd, "imp_k0", 0, 1, os.path.join(wd, "ticket.npz"))
    with rundir_lock.Lock(wd):
        held = stat.S_IMODE(os.stat(rundir_lock.lock_path(wd)).st_mode)
    modes = _modes(wd)
    for f in ("config.json", "metrics.jsonl", "rounds.jsonl", "summary.json", "report.md",
              "eval_mask.json", "ticket.npz", "runs/imp_k0-seed0/masks/round_001.npz",
              "runs/imp_k0-seed0/identity.json", "runs/imp_k0-seed0/checksums.json",
              "plots/accuracy_vs_sparsity.png"):
        assert f in modes, f
    assert any(f.startswith("runs/dp-seed0/checkpoints/1/") for f in modes)
    assert any(f.startswith("tb/imp_k0-seed0/") for f in modes)
    assert any(f.startswith(paths.SUPERSEDED) and f.endswith("round_001.npz") for f in modes)
    wrong = {f: oct(m) for f, m in modes.items()
             if m != (0o770 if os.path.isdir(os.path.join(wd, f)) else 0o660)}
    assert wrong == {} and held == 0o660


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the umask in /proc")
def test_reading_the_umask_never_sets_it(umask, monkeypatch):
    """Setting it, even for a moment, would give files other threads create then (orbax saves
    checkpoints from its own threads) mode 0o666."""
    def refuse(mask):
        raise AssertionError(f"os.umask({oct(mask)}) called")
    monkeypatch.setattr(os, "umask", refuse)
    assert atomic.file_mode() == 0o660
