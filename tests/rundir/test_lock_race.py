"""The workdir lock under contention, and the commands that write into a workdir taking it
(dp_jax/rundir/lock.py; the single-process rules are in tests/rundir/test_identity.py)."""

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from dp_jax.rundir import lock as rundir_lock

CONTENDERS, TRIALS = 8, 30
# What each trial leaves for the contenders to take over: a dead process's lock (a pid above
# Linux's largest), an empty file, garbage.
STALE = [json.dumps({"pid": 2**22 + 4321, "host": socket.gethostname()}), "", "{garbage"]


def _mark(log: str, text: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, (text + "\n").encode())  # one O_APPEND write: never torn by another
    finally:
        os.close(fd)


def _contender(wd: str, log: str, barrier) -> None:
    """Every trial: wait for the stale lock, try to take it, mark entering and leaving."""
    # Both windows of the takeover widened, in this forked child only: between opening the
    # file and locking it (a holder may unlink it meanwhile), and between reading the holder
    # and writing oneself in.
    read_holder, flock = rundir_lock._holder, rundir_lock.fcntl.flock

    def slow_holder(fd):
        out = read_holder(fd)
        time.sleep(0.003)
        return out

    def slow_flock(fd, op):
        time.sleep(0.004 * (os.getpid() % 4))
        return flock(fd, op)
    rundir_lock._holder, rundir_lock.fcntl.flock = slow_holder, slow_flock
    try:
        for trial in range(TRIALS):
            barrier.wait()
            try:
                with rundir_lock.Lock(wd):
                    _mark(log, f"enter {trial} {os.getpid()}")
                    time.sleep(0.002)
                    _mark(log, f"exit {trial} {os.getpid()}")
            except RuntimeError as e:
                assert "is in use by process" in str(e), e
            barrier.wait()
    except BaseException as e:  # the parent sees the error line and a non-zero exit code
        _mark(log, f"error {type(e).__name__}: {e}")
        barrier.abort()  # nobody waits for this process
        os._exit(1)
    os._exit(0)


# The contenders only take a file lock: no JAX runs in the forked children.
@pytest.mark.filterwarnings("ignore:os.fork")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded")
def test_racing_to_take_over_a_stale_lock_leaves_one_holder_at_a_time(tmp_path):
    """8 processes start together on a stale lock file, 30 times: someone always takes it
    over, and no two are ever inside at once (enter/exit marks never interleave)."""
    wd, log = str(tmp_path), str(tmp_path / "held.log")
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(CONTENDERS + 1, timeout=60)
    procs = [ctx.Process(target=_contender, args=(wd, log, barrier)) for _ in range(CONTENDERS)]
    for p in procs:
        p.start()
    failure = None
    try:
        for trial in range(TRIALS):
            with open(rundir_lock.lock_path(wd), "w") as f:
                f.write(STALE[trial % len(STALE)])
            barrier.wait()  # go
            barrier.wait()  # everyone has tried
            assert not os.path.exists(rundir_lock.lock_path(wd)), "the last holder left it"
    except BaseException as e:  # a contender failed (its error line is reported), or we did
        failure = e
        barrier.abort()
    finally:
        for p in procs:
            p.join(60)
    lines = [line.split() for line in open(log).read().splitlines()]
    errors = [" ".join(x) for x in lines if x[0] == "error" and "BrokenBarrier" not in x[1]]
    assert not errors, errors
    if failure is not None:
        raise failure
    assert [p.exitcode for p in procs] == [0] * CONTENDERS
    assert len(lines) % 2 == 0
    for enter, leave in zip(lines[::2], lines[1::2]):
        assert enter[0] == "enter" and leave == ["exit"] + enter[1:], (enter, leave)
    assert {int(x[1]) for x in lines} == set(range(TRIALS)), "a stale lock was not taken over"


def test_holding_locks_an_existing_workdir_only(tmp_path):
    calls = []

    @rundir_lock.holding("workdir")
    def write(config, workdir, *, x=0):
        calls.append(os.path.exists(rundir_lock.lock_path(workdir)))
        return x

    wd = str(tmp_path / "wd")
    assert write(None, wd, x=3) == 3 and calls == [False]  # no workdir yet: nobody to exclude
    os.makedirs(wd)
    assert write(None, workdir=wd) == 0 and calls == [False, True]
    assert not os.path.exists(rundir_lock.lock_path(wd))
    with rundir_lock.Lock(wd):
        with pytest.raises(RuntimeError, match=f"in use by process {os.getpid()}"):
            write(None, wd)
    assert len(calls) == 2


def test_writing_into_locks_only_paths_inside_the_workdir(tmp_path):
    wd = tmp_path / "wd"
    wd.mkdir()
    with rundir_lock.writing_into(str(wd), str(tmp_path / "out.npz")):
        assert not os.path.exists(rundir_lock.lock_path(str(wd)))
    with rundir_lock.writing_into(str(wd), str(wd / "sub" / "t.npz")) as held:
        assert held.held and os.path.exists(rundir_lock.lock_path(str(wd)))
    with rundir_lock.writing_into(str(tmp_path / "wd2"), str(tmp_path / "wd2" / "t.npz")):
        pass  # a workdir that does not exist: nothing to lock, nothing created
    assert not (tmp_path / "wd2").exists()


def test_analyze_eval_mask_and_export_wait_for_no_one(tiny_config, tmp_path):
    """While another process holds a workdir, the commands that write into it fail at once
    naming the holder, before any work."""
    from dp_jax.tasks import analyze, eval_mask, export
    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / "config.json").write_text("{}")
    busy = f"in use by process {os.getpid()}"
    with rundir_lock.Lock(str(wd)):
        with pytest.raises(RuntimeError, match=busy):
            analyze.run(str(wd))
        with pytest.raises(RuntimeError, match=busy):
            eval_mask.evaluate_mask(tiny_config, str(tmp_path / "no_mask.npz"), str(wd))
        with pytest.raises(RuntimeError, match=busy):
            with rundir_lock.writing_into(str(wd), str(wd / "ticket.npz")):
                export.fileio.atomic_write_bytes(str(wd / "ticket.npz"), b"")
    assert sorted(os.listdir(wd)) == ["config.json"]


def test_the_report_command_refuses_a_workdir_in_use(tmp_path):
    wd = tmp_path / "wd"
    wd.mkdir()
    cmd = [sys.executable, "-m", "dp_jax.cli", "report", str(wd)]
    env = dict(os.environ, JAX_PLATFORMS="cpu", DP_JAX_MALLOC_HUGETLB="0")
    with rundir_lock.Lock(str(wd)):
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith(
        f"error: workdir {wd} is in use by process {os.getpid()}")
    assert sorted(os.listdir(wd)) == []
