"""Checksums of the files a resume trusts, so damaged or foreign files are never used silently.

Each directory that owns such files (a run directory, the workdir for its distilled set) keeps a
``checksums.json`` manifest ``{relative path: sha256}``, written atomically right after the file
it describes. A file is trusted only when its digest matches; a file written but not yet
recorded (a kill between the two writes) counts as damaged, so the work is redone. A file or a
directory (an orbax checkpoint step) is hashed over its relative paths and contents, in order.

Readers go through :func:`verified`: a file is used only when it checks out, otherwise a one-line
ValueError names it and why ("missing", "damaged (checksum mismatch)", "not recorded (...)").
Whether an unrecorded file is damage is the caller's to say (``required``): a directory made
before checksums covered that file has none to compare with.
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
        return f"not recorded ({_unrecorded(directory)})"
    if digest(path) != want:
        return "damaged (checksum mismatch)"
    return None


def _unrecorded(directory: str) -> str:
    """Why a file has no record: the manifest is gone or unreadable, or the write was cut."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        return f"{path} is missing"
    try:
        with open(path) as f:
            json.load(f)
    except (OSError, ValueError):
        return f"{path} is unreadable"
    return "written by an interrupted or older run"


def recorded(directory: str, rel: str) -> bool:
    """Whether the manifest of ``directory`` has a record of ``rel`` (matching or not)."""
    return rel in _manifest(directory)


def adopt(directory: str, rels) -> None:
    """Record those of ``rels`` that exist and have no record yet (files written before
    checksums covered them, trusted as they are); recorded ones are left to be checked."""
    entries = _manifest(directory)
    new = {rel: digest(os.path.join(directory, rel)) for rel in rels
           if rel not in entries and os.path.exists(os.path.join(directory, rel))}
    if new and jax.process_index() == 0:
        _write_manifest(directory, {**entries, **new})


def verified(directory: str, rel: str, what: str, *, required: bool = True) -> str:
    """The path of ``directory/rel`` once it checks out against the manifest.

    Raises ValueError ``"<what> <path> is <why>"`` when it is missing, damaged or (with
    ``required``) not recorded. ``required=False`` is for directories made before checksums
    covered the file: a file without a record is trusted, a recorded one is still checked.
    """
    path = os.path.join(directory, rel)
    why = problem(directory, rel)
    if why is not None and (required or why == "missing" or recorded(directory, rel)):
        raise ValueError(f"{what} {path} is {why}")
    return path


def has_records(directory: str) -> bool:
    """Whether ``directory`` has a manifest (workdirs made before checksums have none)."""
    return os.path.exists(os.path.join(directory, MANIFEST))
