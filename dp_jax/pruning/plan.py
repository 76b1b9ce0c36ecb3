"""What the round engine runs: a method entry (:class:`Spec`), the context a method plans one
run with (:class:`Context`) and the plan itself (:class:`Plan`)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import jax

from dp_jax.pruning.settings import Experiment

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Spec:
    """One parsed ``prune.method`` entry: the method's name, its run label and options."""
    name: str
    label: str
    options: tuple = ()  # sorted (option, value) pairs

    def opt(self, key: str, default=None):
        """The value of option ``key`` (``default`` when not set)."""
        return dict(self.options).get(key, default)

    @property
    def rewind_step(self) -> int:
        """The step whose weights every round trains from (0 = init)."""
        return int(self.opt("k", 0))

    @property
    def source(self) -> Optional[str]:
        """reinit: the label of the run whose masks are reused."""
        return self.opt("of")


class Start(NamedTuple):
    """Where every round's training starts: the dense run's weights at ``step`` (``rewind``;
    step 0 is the init) or a fresh initialisation from the seed's reinit key (``reinit``)."""
    kind: str      # "rewind" | "reinit"
    step: int = 0

    @property
    def reinit(self) -> bool:
        """True for a fresh initialisation."""
        return self.kind == "reinit"


REINIT = Start("reinit")


class Distilled(NamedTuple):
    """The distilled set on the devices and Distilled Pruning's compiled inner loop on it."""
    x: jax.Array
    y: jax.Array
    inner_train: Callable   # the small-set training program (dp_jax.training.small_set)
    lr: float               # the step size learned with the set


@dataclasses.dataclass
class Context:
    """What a run of one method for one seed can use to build its plan."""
    setup: Any            # dp_jax.pruning.rounds.Setup
    workdir: str
    seed: int
    seed_key: jax.Array
    dense: dict           # the seed's dense run: variables (init), trained, snapshots, record
    config: Experiment    # the typed settings (methods read their sections)
    distilled: Optional[Distilled] = None  # when a method needs the distilled set


@dataclasses.dataclass(frozen=True)
class Plan:
    """How one run produces its rounds (the arguments of dp_jax.pruning.rounds.run_rounds)."""
    next_mask: Callable[[int, PyTree, dict], PyTree]  # (round, mask, trained) -> mask
    start_point: Callable[[int], tuple]                # round -> (variables, start_step)
    search_examples: Callable[[int], int]              # round -> examples to find its mask
    uses_trained: Callable[[int], bool] = lambda rnd: False  # mask from round r-1's training?


DENSE = Spec(name="dense", label="dense")  # the shared dense training of a seed
