"""Learning-rate rewinding (Renda, Frankle & Carbin, ICLR 2020): IMP without weight rewinding.

Round r's mask is IMP's: ``prune.fraction`` of round r-1's survivors go, by magnitude of round
r-1's *trained* weights (round 1: the dense run's). The survivors then train on *from those
trained weights* (masked; their batch statistics too; fresh optimiser moments) with the whole
learning-rate schedule and data order of the dense run restarted at step 0: every round is one
full training, as long as the dense one. Only the schedule is rewound, not the weights.

The start point comes from :func:`dp_jax.pruning.plan.from_trained` (``Start("trained")``): the
round engines hand ``next_mask`` the previous round's trained variables, restored from its
checkpoint after a resume. Search examples are counted as IMP's with k = 0: round 1's mask
costs the dense training, every later one the previous round's full training.
"""

from __future__ import annotations

from dp_jax.methods import base, imp
from dp_jax.pruning.plan import TRAINED, from_trained


class LRR(base.Method):
    """Magnitude pruning of the last trained network, retrained from it with the full schedule."""
    name = "lrr"
    title = "LRR (learning-rate rewinding)"

    def start(self, spec):
        return TRAINED

    def plan(self, spec, ctx):
        next_mask, start_point = from_trained(imp.magnitude_next_mask(ctx.setup))
        return base.Plan(next_mask=next_mask, start_point=start_point,
                         search_examples=imp.real_training_examples(ctx.setup, 0),
                         uses_trained=lambda rnd: True)


METHOD = LRR()
