"""Atomic writes: a temporary file in the same directory, then ``os.replace``, so a killed
process leaves the old file or the new one, never half of one. Kept apart from
:mod:`dp_jax.storage.fileio` (which imports orbax) for light modules such as ``dp_jax.masks``.
"""

from __future__ import annotations

import errno
import os
import tempfile

import jax

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class NoSpaceError(RuntimeError):
    """The disk (or quota) is full: a user problem, reported in one line by the command line."""


def no_space(path: str, e: OSError) -> NoSpaceError:
    """The error to raise when writing ``path`` failed for lack of space."""
    return NoSpaceError(f"no space left to write {path} ({e.strerror}); free some space or use "
                        "a --workdir on another disk, then run the same command again to resume")


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically; only process 0 of a multi-host run writes."""
    if jax.process_index() != 0:  # every process holds the same results: write them once
        return
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        # mkstemp creates 0600; every output gets the mode a plain open() would give it.
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in NO_SPACE:
            raise no_space(path, e) from e
        raise


def file_mode() -> int:
    """The mode a plain ``open(path, "w")`` gives a new file: ``0o666`` less the umask."""
    return 0o666 & ~_umask()


def _umask() -> int:
    # Linux shows the umask in /proc: reading it there leaves it alone. os.umask() can only
    # read it by setting it, and for that moment every file another thread creates (orbax
    # writes checkpoints from its own threads) would get mode 0o666.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)  # the least permissive value for the moment it is set
    os.umask(mask)
    return mask
