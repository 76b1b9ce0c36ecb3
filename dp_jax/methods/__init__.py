"""Pruning methods, registered by name (the entries of ``prune.method``).

Adding a method is one module defining a :class:`~dp_jax.methods.base.Method` and one
line in ``_BUILTIN`` below (or, outside the package, :func:`register` called from a module
listed in ``prune.plugins``); docs/extending.md shows a worked example.
"""

from __future__ import annotations

from dp_jax.methods import (dp, dp_imp, force, grasp, imp, invert, lrr, mag_init, random,
                            reinit, shuffle, snip, subset, synflow)
from dp_jax.methods.base import Context, Method, Option, Plan, Spec
from dp_jax.methods.registry import (REGISTRY, get, load_plugins, parse, pretty, register)
from dp_jax.pruning.plan import DENSE

_BUILTIN = (imp.METHOD, random.METHOD, reinit.METHOD, dp.METHOD, dp_imp.METHOD,
            snip.METHOD, grasp.METHOD, synflow.METHOD, mag_init.METHOD, subset.METHOD,
            lrr.METHOD, force.METHOD, shuffle.METHOD, invert.METHOD)
for _m in _BUILTIN:
    register(_m)

__all__ = ["Context", "Method", "Option", "Plan", "Spec", "REGISTRY", "get", "parse",
           "register", "load_plugins", "pretty", "DENSE"]
