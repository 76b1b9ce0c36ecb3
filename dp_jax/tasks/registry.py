"""The tasks a config can name (``config.task``): name -> ``fn(config, workdir, *,
restart_changed=False) -> summary dict``. ``register`` adds one."""

from __future__ import annotations

from typing import Callable

from dp_jax.tasks import distill, prune

TASKS: dict[str, Callable] = {"prune": prune.run, "distill": distill.run}


def register(name: str, fn: Callable) -> Callable:
    """Add task ``name``; refuses to replace one that exists."""
    if name in TASKS:
        raise ValueError(f"task {name!r} is already registered")
    TASKS[name] = fn
    return fn


def get(name: str) -> Callable:
    """The task called ``name`` (a ValueError lists the known ones)."""
    if name not in TASKS:
        raise ValueError(f"config.task={name!r} is invalid; allowed: {', '.join(TASKS)}")
    return TASKS[name]
