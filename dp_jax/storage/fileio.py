"""Small, safe file I/O: atomic writes, JSON lines, and round checkpoints (orbax).

Every file this package writes goes through a temporary file in the same
directory followed by ``os.replace``, so a killed process leaves either the old
or the new file, never half of one.

Round checkpoints use orbax's ``CheckpointManager`` (one step per completed round;
orbax itself writes to a temporary directory and renames on commit, and never
lists an unfinished step). Each step stores a pytree of arrays plus a JSON
payload (the round records), so a run restarted after a kill resumes after its
last *complete* round and rewrites its records exactly.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from dp_jax.storage import atomic


NO_SPACE, NoSpaceError, no_space, atomic_write_bytes = (
    atomic.NO_SPACE, atomic.NoSpaceError, atomic.no_space, atomic.atomic_write_bytes)


def _os_error(e: BaseException):
    """The first OSError in ``e``'s chain of causes, if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def write_json(path: str, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON (numpy scalars converted, NaN -> null)."""
    atomic_write_bytes(path, (json.dumps(_jsonable(obj), indent=2, sort_keys=True) + "\n").encode())


def write_jsonl(path: str, rows: Iterable[dict]) -> None:
    """Atomically (re)write a JSON-lines file."""
    text = "".join(json.dumps(_jsonable(r), sort_keys=True) + "\n" for r in rows)
    atomic_write_bytes(path, text.encode())


def append_jsonl(path: str, row: dict) -> None:
    """Append one JSON object as a line (metrics streams; a torn last line is skipped on read)."""
    if jax.process_index() != 0:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        with open(path, "a") as f:
            f.write(json.dumps(_jsonable(row), sort_keys=True) + "\n")
    except OSError as e:
        if e.errno in NO_SPACE:
            raise no_space(path, e) from e
        raise


def read_jsonl(path: str, *, strict: bool = False) -> list[dict]:
    """Rows of a JSON-lines file; a torn final line (killed writer) is ignored, others must parse.

    ``strict``: for files written whole and atomically (rounds.jsonl), where no writer can
    leave a torn line: every line must be a JSON object, else ValueError naming the line.
    """
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = f.read().split("\n")
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1 and not strict:  # no trailing newline: killed mid-line
                break
            raise ValueError(f"{path}:{i + 1} is not valid JSON (damaged): {e}") from e
        if strict and not isinstance(row, dict):
            raise ValueError(f"{path}:{i + 1} is not a JSON object (damaged)")
        rows.append(row)
    if strict and lines[-1]:
        raise ValueError(f"{path} does not end with a newline (damaged: a torn last line)")
    return rows


def read_json(path: str) -> Any:
    """Parse a JSON file with an error that names it."""
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON (truncated or corrupt?): {e}") from e


def _checkpointable(tree: Any) -> Any:
    """Host-local device arrays -> numpy when several processes run.

    orbax saves global arrays jointly across hosts but refuses arrays that live on one
    host's device (masks and init built per host hold the same values on every host);
    as numpy they are written once, by the primary host. No-op on a single process.
    """
    if jax.process_count() == 1:
        return tree

    def convert(a):
        if isinstance(a, jax.Array) and a.is_fully_addressable:
            return np.asarray(a)
        return a
    return jax.tree.map(convert, tree)


class RoundCheckpointer:
    """Per-round checkpoints of a pruning run: ``save(round, arrays, payload)``, ``restore``."""

    def __init__(self, directory: str, max_to_keep: int | None = 2):
        self.directory = os.path.abspath(directory)
        opts = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                            enable_async_checkpointing=False)
        self._mgr = ocp.CheckpointManager(self.directory, options=opts)

    def latest(self) -> int | None:
        """The last completely written round, or None."""
        return self._mgr.latest_step()

    def all_steps(self) -> list[int]:
        """Every completely written round, ascending."""
        return sorted(self._mgr.all_steps())

    def delete(self, step: int) -> None:
        """Remove round ``step`` (a damaged checkpoint, so that it is recomputed)."""
        self._mgr.delete(step)

    def save(self, step: int, arrays: Any, payload: dict) -> None:
        """Save a pytree of arrays and a JSON payload as ``step`` (blocks until committed)."""
        arrays = _checkpointable(arrays)
        try:
            self._mgr.save(step, args=ocp.args.Composite(
                arrays=ocp.args.StandardSave(arrays),
                payload=ocp.args.JsonSave(_jsonable(payload))))
            self._mgr.wait_until_finished()
        except Exception as e:
            # The checkpoint library may wrap the OSError; a full disk is reported plainly.
            cause = _os_error(e)
            if cause is not None and cause.errno in NO_SPACE:
                raise no_space(f"{self.directory}/{step}", cause) from e
            raise

    def restore(self, step: int, like: Any) -> tuple[Any, dict]:
        """Restore ``(arrays, payload)`` of ``step``; ``like`` gives the array structure."""
        like = _checkpointable(like)
        try:
            out = self._mgr.restore(step, args=ocp.args.Composite(
                arrays=ocp.args.StandardRestore(like), payload=ocp.args.JsonRestore()))
        except Exception as e:  # orbax raises many types for corrupt files
            raise ValueError(f"checkpoint {self.directory}/{step} is corrupt or does not match "
                             f"this config: {type(e).__name__}: {e}") from e
        # Restored arrays come back committed to a device; fresh ones are not, and jit
        # compiles a second program when the two kinds are mixed.
        arrays = jax.tree.map(lambda a: jnp.asarray(np.asarray(a)), out["arrays"])
        return arrays, out["payload"]

    def restore_payload(self, step: int) -> dict:
        """The JSON payload of ``step`` alone (to learn the array structure before restoring)."""
        try:
            out = self._mgr.restore(step, args=ocp.args.Composite(payload=ocp.args.JsonRestore()))
        except Exception as e:  # orbax raises many types for corrupt files
            raise ValueError(f"checkpoint {self.directory}/{step} is corrupt: "
                             f"{type(e).__name__}: {e}") from e
        return out["payload"]

    def close(self) -> None:
        """Wait for pending writes and release the manager."""
        self._mgr.wait_until_finished()
        self._mgr.close()
