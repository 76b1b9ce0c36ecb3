"""Seconds this process has spent compiling (tracing, lowering, XLA compilation, cache reads).

JAX reports each phase of every compilation through ``jax.monitoring``; one listener sums
them, so that a round's record can state ``compile_s`` apart from its search and training
time and wall figures compare work, not compilation.
"""

from __future__ import annotations

import threading

_PREFIXES = ("/jax/core/compile/", "/jax/compilation_cache/cache_retrieval")
_lock = threading.Lock()
_total = [0.0]
_installed = [False]
_cache = {"hits": 0, "misses": 0}


def _listen(event: str, duration: float, **kwargs) -> None:
    if event.startswith(_PREFIXES):
        with _lock:
            _total[0] += float(duration)


def _count(event: str, **kwargs) -> None:
    for k in _cache:
        if event == f"/jax/compilation_cache/cache_{k}":
            with _lock:
                _cache[k] += 1


def _install() -> None:
    if not _installed[0]:
        from jax import monitoring
        with _lock:
            if not _installed[0]:
                monitoring.register_event_duration_secs_listener(_listen)
                monitoring.register_event_listener(_count)
                _installed[0] = True


def seconds() -> float:
    """Compilation seconds so far in this process (the listener is installed on first use)."""
    _install()
    return _total[0]


def cache_counts() -> dict:
    """``{"hits", "misses"}`` of the persistent compilation cache so far in this process."""
    _install()
    return dict(_cache)


class Stopwatch:
    """``with Stopwatch() as sw: ...`` then ``sw.seconds``: compilation inside the block."""

    def __enter__(self):
        self._start = seconds()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc):
        self.seconds = seconds() - self._start
        return False
