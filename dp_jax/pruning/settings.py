"""Typed settings of the pruning engine (:class:`PruneSettings`, :class:`CheckpointSettings`)
and of a whole experiment (:class:`Experiment`), which dp_jax.tasks.settings.parse builds."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from dp_jax.config.sections import Section
from dp_jax.data.spec import DataSpec
from dp_jax.models.spec import ModelSpec
from dp_jax.rundir.metrics import MetricsSettings
from dp_jax.system.distributed import ParallelSettings
from dp_jax.training.settings import DPSettings, TrainSettings


@dataclasses.dataclass(frozen=True)
class PruneSettings(Section):
    """The pruning schedule and the methods' shared options (``config.prune``)."""
    SECTION: ClassVar[str] = "prune"
    fraction: float
    layer_rates: str
    method: str
    min_per_layer: int
    on_empty_layer: str
    plugins: str
    rewind_step: int
    evaluate: str
    rounds: int
    scope: str
    score_batches: int


@dataclasses.dataclass(frozen=True)
class CheckpointSettings(Section):
    """Which round checkpoints a run keeps (``config.checkpoint``)."""
    SECTION: ClassVar[str] = "checkpoint"
    keep: str


@dataclasses.dataclass(frozen=True)
class Experiment:
    """Every setting of one experiment, typed: what the library reads instead of the config.

    ``specs`` are ``prune.method``'s entries, parsed once; ``distill`` is a
    :class:`dp_jax.distill.settings.DistillSettings` (a higher layer owns its type).
    """
    task: str
    seed: int
    seeds: int
    data: DataSpec
    model: ModelSpec
    train: TrainSettings
    dp: DPSettings
    prune: PruneSettings
    checkpoint: CheckpointSettings
    metrics: MetricsSettings
    parallel: ParallelSettings
    distill: Any
    specs: tuple = ()

    def replace(self, **changes) -> "Experiment":
        """A copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)
