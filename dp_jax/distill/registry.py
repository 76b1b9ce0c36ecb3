"""The distillers, registered by name (the values of ``distill.method``).

A distiller builds the :class:`dp_jax.distill.common.DistillProgram` the loop runs
(``build(config, dataset, *, trajectories, mask)``), describes its settings in one line of the
report, and says whether it matches expert trajectories (then the task trains or resumes the
experts first and passes their :class:`~dp_jax.distill.experts.Trajectories`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from dp_jax.distill import dm, gm, mtt


@dataclasses.dataclass(frozen=True)
class Distiller:
    """One distillation method."""
    name: str
    title: str
    build: Callable          # (config, dataset, *, trajectories, mask) -> common.DistillProgram
    describe: Callable       # (DistillSettings) -> one line for the report
    needs_experts: bool = False


DISTILLERS: dict[str, Distiller] = {}
_BUILTIN: set = set()


def register(distiller: Distiller) -> Distiller:
    """Add ``distiller``; a name already registered (built in or not) is refused."""
    if not distiller.name or distiller.name in DISTILLERS:
        raise ValueError(f"distiller {distiller.name!r} is already registered"
                         + (" (built in)" if distiller.name in _BUILTIN else "")
                         if distiller.name else "a distiller needs a name")
    DISTILLERS[distiller.name] = distiller
    return distiller


def get(name: str) -> Distiller:
    """The distiller ``name`` (a ValueError names the allowed ones)."""
    if name not in DISTILLERS:
        raise ValueError(f"config.distill.method={name!r} is invalid; allowed: "
                         + " | ".join(DISTILLERS))
    return DISTILLERS[name]


for _d in (
        Distiller("mtt", "Matching Training Trajectories",
                  lambda config, dataset, *, trajectories, mask=None:
                  mtt.build_method(config, dataset, trajectories, mask=mask),
                  mtt.describe, needs_experts=True),
        Distiller("gm", "Gradient matching",
                  lambda config, dataset, *, trajectories=None, mask=None:
                  gm.build_method(config, dataset, mask=mask), gm.describe),
        Distiller("dm", "Distribution matching",
                  lambda config, dataset, *, trajectories=None, mask=None:
                  dm.build_method(config, dataset, mask=mask), dm.describe)):
    register(_d)
    _BUILTIN.add(_d.name)
