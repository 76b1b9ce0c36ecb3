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
    # The rewind step when it is not the entry's own ``k`` (``shuffle:of=imp_k100`` trains
    # from step 100): set by the method registry from the method's start point.
    start_step: Optional[int] = None

    def opt(self, key: str, default=None):
        """The value of option ``key`` (``default`` when not set)."""
        return dict(self.options).get(key, default)

    @property
    def rewind_step(self) -> int:
        """The step whose weights every round trains from (0 = init)."""
        return int(self.opt("k", 0) if self.start_step is None else self.start_step)

    @property
    def source(self) -> Optional[str]:
        """reinit: the label of the run whose masks are reused."""
        return self.opt("of")


class Start(NamedTuple):
    """Where every round's training starts: the dense run's weights at ``step`` (``rewind``;
    step 0 is the init), a fresh initialisation from the seed's reinit key (``reinit``) or the
    previous round's trained weights, at step 0 (``trained``: learning-rate rewinding; round 1
    starts from the dense run's trained weights)."""
    kind: str      # "rewind" | "reinit" | "trained"
    step: int = 0

    @property
    def reinit(self) -> bool:
        """True for a fresh initialisation."""
        return self.kind == "reinit"


REINIT = Start("reinit")
TRAINED = Start("trained")


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
    """How one run produces its rounds (the arguments of dp_jax.pruning.rounds.run_rounds);
    a round that trains from the previous round's trained weights: :func:`from_trained`."""
    next_mask: Callable[[int, PyTree, dict], PyTree]  # (round, mask, trained) -> mask
    start_point: Callable[[int], tuple]                # round -> (variables, start_step)
    search_examples: Callable[[int], int]              # round -> examples to find its mask
    uses_trained: Callable[[int], bool] = lambda rnd: False  # mask from round r-1's training?


DENSE = Spec(name="dense", label="dense")  # the shared dense training of a seed


def parse_evaluate(text: str, rounds: int) -> Optional[frozenset]:
    """``prune.evaluate`` (``'5,6'``: rounds to train and test) as a set; None (every round)
    for ``''``. Raises ValueError naming the allowed values."""
    if not str(text).strip():
        return None
    out = set()
    for part in str(text).split(","):
        try:
            rnd = int(part.strip())
        except ValueError:
            raise ValueError(f"{part.strip()!r} is not a round; give comma-separated rounds in "
                             f"1..{rounds} (e.g. '{rounds}'), or '' for every round") from None
        if not 1 <= rnd <= rounds:
            raise ValueError(f"round {rnd} is outside 1..{rounds} (prune.rounds={rounds}; round "
                             "0, the dense network, is always trained)")
        out.add(rnd)
    return frozenset(out)


def rounds_to_train(plan: Plan, start: Start, rounds: int,
                    evaluate: Optional[frozenset]) -> Callable[[int], bool]:
    """``round -> bool``: whether the round engine trains and tests round r. Every round with
    ``evaluate`` None; otherwise the rounds it names and every round whose training a later
    round needs (that round's mask comes from it, as IMP's, or it starts from it, as LRR's)."""
    def trains(rnd: int) -> bool:
        if evaluate is None or rnd == 0 or rnd in evaluate:
            return True
        return rnd < rounds and (start.kind == TRAINED.kind or bool(plan.uses_trained(rnd + 1)))
    return trains


def from_trained(next_mask: Callable[[int, PyTree, dict], PyTree]) -> tuple[Callable, Callable]:
    """``(next_mask, start_point)`` of a plan whose round r trains from round r-1's trained
    variables at step 0 (:data:`TRAINED`; the round engine masks them).

    Both round engines (``rounds.run_rounds`` and ``seeds.run_rounds_seeds``) call
    ``next_mask(r, mask, trained)`` and then ``start_point(r)`` for every round, with
    ``trained`` the previous round's trained variables (after a resume, those of the last
    checkpointed round): the returned ``next_mask`` keeps them for ``start_point``.
    """
    kept: dict = {}

    def keep(rnd, mask, trained):
        kept.clear()  # only the current round's: the older ones would pin device memory
        kept[rnd] = trained
        return next_mask(rnd, mask, trained)

    def start(rnd):
        if rnd not in kept:
            raise RuntimeError(f"start_point({rnd}) was called before next_mask({rnd}): a plan "
                               "made by from_trained needs the round's trained variables first")
        return kept[rnd], 0
    return keep, start


def remaining_per_round(sizes: dict, fraction: float, rounds: int, *, min_per_layer: int = 0,
                        scope: str = "global", rates: Optional[dict] = None) -> list[int]:
    """The prunable weights left after each of rounds 0..``rounds`` when every round prunes
    ``fraction`` of the survivors as :func:`dp_jax.masks.prune` does (the same rounding and
    collapse guard); ``sizes`` is ``{prunable path: weights}``, ``rates`` resolved
    ``prune.layer_rates``. Exact for layer-wise pruning; for a global threshold the guard is
    applied to the pooled layers, which is what decides a stall (a round that prunes nothing).
    """
    rates = rates or {}
    alive = {k: int(v) for k, v in sizes.items()}
    own = [k for k in alive if scope == "layerwise" or k in rates]
    pool = [k for k in alive if k not in own]
    pool_alive = sum(alive[k] for k in pool)
    pool_floor = sum(min(min_per_layer, alive[k]) for k in pool)
    out = [sum(alive.values())]
    for _ in range(rounds):
        for k in own:
            cut = int(round(fraction * rates.get(k, 1.0) * alive[k]))
            alive[k] = max(alive[k] - cut, min(min_per_layer, alive[k]))
        pool_alive = max(pool_alive - int(round(fraction * pool_alive)), pool_floor)
        out.append(sum(alive[k] for k in own) + pool_alive)
    return out
