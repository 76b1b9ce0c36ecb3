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


def _listen(event: str, duration: float, **kwargs) -> None:
    if event.startswith(_PREFIXES):
        with _lock:
            _total[0] += float(duration)


def seconds() -> float:
    """Compilation seconds so far in this process (the listener is installed on first use)."""
    if not _installed[0]:
        from jax import monitoring
        with _lock:
            if not _installed[0]:
                monitoring.register_event_duration_secs_listener(_listen)
                _installed[0] = True
    return _total[0]


class Stopwatch:
    """``with Stopwatch() as sw: ...`` then ``sw.seconds``: compilation inside the block."""

    def __enter__(self):
        self._start = seconds()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc):
        self.seconds = seconds() - self._start
        return False
