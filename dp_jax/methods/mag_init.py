"""Magnitude at init: prune the smallest |w| of the initial weights (no training, no data).

The scores never change, so pruning ``prune.fraction`` of the survivors each round is the
same as one-shot pruning to each round's sparsity; masks are nested.
"""

from __future__ import annotations

from dp_jax import masks as masks_lib
from dp_jax.pruning import rounds as prune_lib
from dp_jax.methods import base


class MagnitudeAtInit(base.Method):
    """|w| of the init, the simplest pruning-at-init baseline."""
    name = "mag_init"
    title = "Magnitude at init"
    data_free = True

    def plan(self, spec, ctx):
        scores = masks_lib.magnitude_scores(ctx.dense["variables"]["params"])
        return base.Plan(
            next_mask=lambda rnd, mask, trained: prune_lib.prune_step(ctx.setup, scores, mask),
            start_point=base.rewind_start(ctx.dense, 0), search_examples=lambda rnd: 0)


METHOD = MagnitudeAtInit()
