"""Typed settings of the two training recipes: real-data training (:class:`TrainSettings`) and
the small-set inner loop of Distilled Pruning and its controls (:class:`DPSettings`)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from dp_jax.config.sections import Section


@dataclasses.dataclass(frozen=True)
class TrainSettings(Section):
    """Real-data training: every evaluation of a mask and IMP's inner loop (``config.train``)."""
    SECTION: ClassVar[str] = "train"
    batch_size: int
    compute_dtype: str
    decay_at: tuple
    decay_factor: float
    epochs: int
    eval_batch_size: int
    loop: str
    lr: float
    momentum: float
    nesterov: bool
    optimizer: str
    schedule: str
    unroll: int
    weight_decay: float


@dataclasses.dataclass(frozen=True)
class DPSettings(Section):
    """Distilled Pruning's inner loop on a small set, shared by the subset control (``config.dp``)."""
    SECTION: ClassVar[str] = "dp"
    augment: str
    batch_size: int
    chunk: int
    cutmix_beta: float
    cutmix_prob: float
    decay_at: tuple
    decay_factor: float
    epochs: int
    inner_seeds: int
    loop: str
    lr: float
    momentum: float
    steps: int
    subset_lr: float
    switch_sparsity: float
    unroll: int
    weight_decay: float

    @property
    def by_epochs(self) -> bool:
        """True when ``epochs`` (> 0) sets the inner loop's length: ``steps`` is then unused."""
        return self.epochs > 0
