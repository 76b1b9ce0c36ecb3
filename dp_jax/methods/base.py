"""The method protocol: what one pruning method says about itself.

A method is one object (a :class:`Method` subclass instance) registered by name in
:mod:`dp_jax.methods`. It declares its options (parsed from its ``prune.method`` entry,
e.g. ``imp:k=200`` or ``snip:oneshot``), its run label, how it is validated, and builds
the :class:`Plan` of one run: round r's mask from what the round has (the previous mask
and trained weights, plus the context: init, data, distilled set), the weights round r
trains from, and the examples its mask search processes. The generic round loop
(:func:`dp_jax.pruning.rounds.run_rounds`) does the rest: evaluation, checkpoints, records.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

from dp_jax import masks as masks_lib
from dp_jax.pruning.plan import Context, Plan, Spec, Start
from dp_jax.rundir import verified

__all__ = ["Context", "Method", "Option", "Plan", "Spec"]


@dataclasses.dataclass(frozen=True)
class Option:
    """One option of a method entry: ``name=value`` (or a bare ``name`` when ``flag``)."""
    name: str
    parse: Callable[[str], Any] = str  # raises ValueError with a readable message
    default: Any = None                # a value, or ``fn(config) -> value``
    help: str = ""
    flag: bool = False


class Method:
    """Base of every pruning method; subclasses set the class attributes and :meth:`plan`."""
    name: str = ""
    title: str = ""                 # the report's name of the method
    options: tuple = ()             # Option, ...
    needs_distilled: bool = False   # a distilled set is made/loaded before its runs
    needs_dp: bool = False          # it uses the ``dp`` section (the small-set inner loop)
    data_free: bool = False         # its mask search reads no training data

    def label(self, opts: dict) -> str:
        """The run label (rounds.jsonl, directory names, plots) for parsed options."""
        return self.name

    def describe(self, label: str) -> Optional[str]:
        """The report's name for ``label`` if it is one of this method's labels."""
        if label == self.name:
            return self.title
        if label.startswith(self.name + "_k") and label[len(self.name) + 2:].isdigit():
            return f"{self.title} (k={label[len(self.name) + 2:]})"
        return None

    def validate(self, spec: Spec, config, earlier: list) -> None:
        """Checks that need only the config (``earlier``: specs listed before this one)."""

    def validate_with_data(self, spec: Spec, config, num_train: int, num_classes: int) -> None:
        """Checks that need the training set's size and class count."""

    def start(self, spec: Spec) -> Start:
        """Where every round's training starts (:class:`~dp_jax.pruning.plan.Start`)."""
        return Start("rewind", spec.rewind_step)

    def plan(self, spec: Spec, ctx: Context) -> Plan:
        """The plan of one run (see :class:`Plan`)."""
        raise NotImplementedError(f"method {self.name!r} has no plan")


def rewind_start(dense: dict, step: int) -> Callable:
    """Start every round from the dense run's weights at ``step`` (0 = init)."""
    def fn(rnd):
        v = dense["variables"] if step == 0 else dense["snapshots"][step]
        return v, step
    return fn


def non_negative_int(what: str) -> Callable[[str], int]:
    """Parser of an integer option >= 0 (``what`` names it in the message)."""
    return bounded_int(what, 0)


def bounded_int(what: str, lo: int) -> Callable[[str], int]:
    """Parser of an integer option >= ``lo``."""
    def parse(v: str) -> int:
        try:
            n = int(v)
        except (TypeError, ValueError):
            raise ValueError(f"{what} must be an integer, got {v!r}") from None
        if n < lo:
            raise ValueError(f"{what} must be >= {lo}, got {v!r}")
        return n
    return parse


REWIND = Option("k", non_negative_int("k (the rewind step)"),
                default=lambda cfg: int(cfg.prune.rewind_step),
                help="rewind step: every round trains from the dense run's weights at step k")
REWIND0 = dataclasses.replace(REWIND, default=0)  # the same option, rewinding to init by default


def source_masks(method: str, spec: Spec, ctx: Context) -> tuple[Callable, Callable]:
    """``(mask_of, search_examples)`` for a method built on another run's masks (``of=LABEL``):
    round r's mask of the source run (checked), and the examples its mask search cost in round
    r, which the borrowing run is charged with."""
    done = {r["round"]: r["train_examples"]
            for r in verified.run_records(ctx.workdir, spec.source, ctx.seed)}
    like = ctx.dense["variables"]["params"]

    def mask_of(rnd):
        if rnd not in done:
            raise FileNotFoundError(f"{method} needs round {rnd} of {spec.source!r} (seed "
                                    f"{ctx.seed}); run its source method first")
        return masks_lib.load(verified.mask_file(ctx.workdir, spec.source, ctx.seed, rnd), like)
    return mask_of, lambda rnd: done[rnd] - done[rnd - 1]
