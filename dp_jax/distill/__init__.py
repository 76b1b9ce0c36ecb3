"""Dataset distillation: Matching Training Trajectories (MTT, the default), gradient matching
(DC/DSA/IDC) and distribution matching (DM), chosen by ``config.distill.method``.

Public API (the distillation *task* is dp_jax.tasks.distill; the defaults are
dp_jax.config.defaults.distill_defaults):

  load_distilled(path) -> DistilledSet           validated read of a distilled.npz
  check_compatible(distilled, dataset)           same dataset / preprocessing, or ValueError
  validate(config)                               static checks of ``config.distill``

Building blocks: ``experts`` (trajectory buffers), ``mtt`` (the unrolled student and its exact
gradient in three memory modes), ``gm`` and ``dm`` (gradient / distribution matching losses and
steps), ``common`` (the method interface, real class batches, shared steps), ``loop`` (one
iteration loop for every method: checkpoints, metrics, periodic evaluation), ``evaluate``
(train on the set, test on real data), ``synthetic`` (initialisation, multi-formation),
``convs`` (convolutions whose second derivatives run fast on XLA:CPU). See
docs/distillation.md.
"""

from dp_jax.distill.config import validate, validate_with_data
from dp_jax.distill.sets import DistilledSet, check_compatible, load_distilled, save_distilled
from dp_jax.distill.experts import ExpertBuffer, load_trajectories, train_experts
from dp_jax.distill.mtt import MEMORY_MODES, TrajectoryMatcher

__all__ = [
    "DistilledSet",
    "ExpertBuffer",
    "MEMORY_MODES",
    "TrajectoryMatcher",
    "check_compatible",
    "load_distilled",
    "load_trajectories",
    "save_distilled",
    "train_experts",
    "validate",
    "validate_with_data",
]
