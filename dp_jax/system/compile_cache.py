"""JAX's persistent compilation cache, on by default for the command line and the tests.

Compiled programs are stored in ``$DP_JAX_COMPILE_CACHE`` (default
``~/.cache/dp_jax/jax_cache``; ``off`` disables the cache), so that a second run of the same
configuration -- a resumed run, another seed in a new process, the CLI tests -- loads its
programs instead of compiling them again. The cache is bounded (``max_size``), which makes JAX
take a file lock around every read and write: several processes may share one directory.
Only programs that took at least ``min_compile_s`` to compile are stored; tiny ones are cheaper
to compile than to read.
"""

from __future__ import annotations

import os
from typing import Optional

ENV = "DP_JAX_COMPILE_CACHE"
DEFAULT_DIR = os.path.join("~", ".cache", "dp_jax", "jax_cache")
MAX_SIZE = 4 << 30  # bytes; least recently used programs are evicted beyond it


def cache_dir(environ=os.environ) -> Optional[str]:
    """The cache directory this process should use, or None when disabled."""
    value = environ.get(ENV, DEFAULT_DIR).strip()
    if value.lower() in ("", "off", "0", "none", "false"):
        return None
    return os.path.abspath(os.path.expanduser(value))


def enable(directory: Optional[str] = None, *, min_compile_s: float = 0.2) -> Optional[str]:
    """Point JAX at the persistent cache (``directory`` or :func:`cache_dir`); returns it.

    Call before the first compilation; entry points call it, library code never does.
    """
    import jax
    directory = directory or cache_dir()
    if directory is None:
        return None
    try:
        import filelock  # noqa: F401  (JAX locks a bounded cache with it)
    except ImportError:
        return None  # without the lock, concurrent writers could tear entries: stay off
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_s))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax.config.update("jax_compilation_cache_max_size", MAX_SIZE)
    return directory
