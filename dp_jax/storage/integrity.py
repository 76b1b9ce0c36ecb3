"""Checksums of the files a resume trusts, so damaged or foreign files are never used silently.

Each directory that owns such files (a run directory, the workdir for its distilled set) keeps a
``checksums.json`` manifest ``{relative path: sha256}``, written atomically right after the file
it describes. A file is trusted only when its digest matches; a file written but not yet
recorded (a kill between the two writes) counts as damaged, so the work is redone. A file or a
directory (an orbax checkpoint step) is hashed over its relative paths and contents, in order.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

import jax

from dp_jax.storage import atomic

MANIFEST = "checksums.json"


def digest(path: str) -> str:
    """SHA-256 of a file, or of a directory tree (relative paths and contents, sorted)."""
    h = hashlib.sha256()
    if os.path.isdir(path):
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                full = os.path.join(root, name)
                h.update(os.path.relpath(full, path).encode() + b"\0")
                _update(h, full)
    else:
        _update(h, path)
    return h.hexdigest()


def _update(h, path: str) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def _manifest(directory: str) -> dict:
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}  # a damaged manifest trusts nothing: every file is re-checked as unrecorded


def _write_manifest(directory: str, entries: dict) -> None:
    atomic.atomic_write_bytes(os.path.join(directory, MANIFEST),
                              json.dumps(entries, indent=1, sort_keys=True).encode())


def record(directory: str, rel: str) -> None:
    """Record the digest of ``directory/rel`` (process 0 only, like every other write)."""
    if jax.process_index() != 0:
        return
    entries = _manifest(directory)
    entries[rel] = digest(os.path.join(directory, rel))
    _write_manifest(directory, entries)


def forget(directory: str, rel: str) -> None:
    """Drop the record of ``directory/rel`` (before it is rewritten or removed)."""
    entries = _manifest(directory)
    if entries.pop(rel, None) is not None and jax.process_index() == 0:
        _write_manifest(directory, entries)


def problem(directory: str, rel: str) -> Optional[str]:
    """Why ``directory/rel`` cannot be trusted (``None`` when its digest matches the record)."""
    path = os.path.join(directory, rel)
    if not os.path.exists(path):
        return "missing"
    want = _manifest(directory).get(rel)
    if want is None:
        return "not recorded (written by an interrupted or older run)"
    if digest(path) != want:
        return "damaged (checksum mismatch)"
    return None


def has_records(directory: str) -> bool:
    """Whether ``directory`` has a manifest (workdirs made before checksums have none)."""
    return os.path.exists(os.path.join(directory, MANIFEST))
