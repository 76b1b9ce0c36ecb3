"""The lock of a workdir: one process at a time writes into it."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import inspect
import json
import os
import socket

from dp_jax.rundir.paths import lock_path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lock:
    """Exclusive use of a workdir (``with Lock(workdir): ...``).

    The holder keeps an exclusive ``flock`` on ``<workdir>/.lock`` (released by the kernel when
    its process dies, so taking over a dead holder's lock is atomic: one process wins) and
    writes ``{"pid", "host"}`` into it for the error message of the others. A lock file whose
    content names a live process of this host, or any process of another host (its liveness
    cannot be checked from here), is refused; an empty, unreadable or dead process's file is
    taken over.
    """

    def __init__(self, workdir: str):
        self.path = lock_path(workdir)
        self.held = False
        self._fd = None

    def __enter__(self):
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(100):  # a holder that unlinks its file on exit makes us retry
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)  # less the umask, like outputs
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                other = _holder(fd)
                os.close(fd)
                raise self._busy(other) from None
            if not _same_file(fd, self.path):  # unlinked by a holder that just finished
                os.close(fd)
                continue
            other = _holder(fd)
            if other and other != me and (other["host"] != me["host"]
                                          or _pid_alive(other["pid"])):
                os.close(fd)
                raise self._busy(other)
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
            os.fsync(fd)
            self._fd, self.held = fd, True
            return self
        raise RuntimeError(f"could not take the lock {self.path}")

    def _busy(self, other: dict) -> RuntimeError:
        return RuntimeError(
            f"workdir {os.path.dirname(self.path)} is in use by process "
            f"{other.get('pid', '?')} on {other.get('host', '?')} ({self.path}); wait "
            "for it to finish, or delete the lock file if that process is gone")

    def __exit__(self, *exc):
        if self.held:
            # Unlinked while still held: a waiter that opened this file sees it is gone.
            if _same_file(self._fd, self.path):
                os.unlink(self.path)
            os.close(self._fd)  # releases the flock
        self.held, self._fd = False, None
        return False


def holding(arg: str = "workdir"):
    """Decorator: the function runs holding the :class:`Lock` of the workdir passed as its
    argument ``arg``, so a command that writes into a workdir never does while another
    process (a running experiment) holds it. A workdir that does not exist yet is not locked:
    nobody else uses it, and the function's own error for a missing workdir stays the one
    the user sees."""
    def wrap(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def locked(*args, **kwargs):
            workdir = signature.bind(*args, **kwargs).arguments[arg]
            if not os.path.isdir(workdir):
                return fn(*args, **kwargs)
            with Lock(workdir):
                return fn(*args, **kwargs)
        return locked
    return wrap


def writing_into(workdir: str, path: str):
    """The lock of ``workdir`` when ``path`` lies inside it (a context manager), else none."""
    inside = os.path.commonpath([os.path.abspath(workdir), os.path.abspath(path)]) == \
        os.path.abspath(workdir)
    return Lock(workdir) if inside and os.path.isdir(workdir) else contextlib.nullcontext()


def _holder(fd: int) -> dict:
    """The ``{"pid", "host"}`` a lock file holds ({} when empty, unreadable or not naming a
    process: a pid 0 or -1 would make the liveness check signal a whole group)."""
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}
    ok = (isinstance(data, dict) and isinstance(data.get("pid"), int)
          and not isinstance(data["pid"], bool) and data["pid"] > 0
          and isinstance(data.get("host"), str))
    return data if ok else {}


def _same_file(fd: int, path: str) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False
