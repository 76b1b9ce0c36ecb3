"""Releases of the JAX stack known to compute wrong results, checked when dp_jax is imported.

pyproject.toml excludes each of them from what ``pip install`` resolves; this list warns a user
whose environment holds one anyway (an older lock file, a pinned image, a hand install).
"""

from __future__ import annotations

import warnings
from importlib import metadata

DP_JAX_VERSION = "0.1.0"  # dp_jax.__version__; recorded in exported tickets

# (distribution, version) -> what is wrong and where it is recorded.
KNOWN_BAD = {
    ("jax", "0.10.2"): "jit of a vmapped matrix-vector product followed by a reduction returns "
                       "wrong values on CPU (jax-ml/jax#39103)",
    ("jaxlib", "0.10.2"): "jit of a vmapped matrix-vector product followed by a reduction "
                          "returns wrong values on CPU (jax-ml/jax#39103)",
}


class KnownBadJaxWarning(UserWarning):
    """An installed JAX release is known to compute wrong results."""


def installed(dist: str) -> str | None:
    """The installed version of distribution ``dist``, or None when it is not installed."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def known_bad(versions: dict[str, str | None] | None = None) -> list[str]:
    """One message per installed known-bad release (``versions`` maps distribution -> version;
    default: what is installed), each naming the defect and the fix."""
    if versions is None:
        versions = {dist: installed(dist) for dist, _ in KNOWN_BAD}
    out = []
    for (dist, bad), why in KNOWN_BAD.items():
        if versions.get(dist) == bad:
            out.append(f"{dist} {bad} is installed, and it is known to compute wrong results: "
                       f"{why}. Numbers from dp_jax may be wrong; fix with "
                       f'pip install "{dist}!={bad}"')
    return out


def warn_if_known_bad() -> None:
    """Warn (once per message) for every installed known-bad release."""
    for message in known_bad():
        warnings.warn(message, KnownBadJaxWarning, stacklevel=3)
