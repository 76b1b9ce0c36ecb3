"""Random pruning: the same per-round schedule with i.i.d. uniform scores (a lower bound)."""

from __future__ import annotations

import jax

from dp_jax import masks as masks_lib
from dp_jax.pruning import rounds as prune_lib
from dp_jax import rng
from dp_jax.methods import base


class Random(base.Method):
    """Scores drawn fresh each round from the seed's random-pruning key."""
    name = "random"
    title = "Random pruning"
    options = (base.REWIND0,)
    data_free = True

    def plan(self, spec, ctx):
        key = jax.random.fold_in(ctx.seed_key, rng.RANDOM_PRUNE)

        def next_mask(rnd, mask, trained):
            scores = masks_lib.random_scores(trained["params"], jax.random.fold_in(key, rnd))
            return prune_lib.prune_step(ctx.setup, scores, mask)
        return base.Plan(next_mask=next_mask,
                         start_point=base.rewind_start(ctx.dense, spec.rewind_step),
                         search_examples=lambda rnd: 0)


METHOD = Random()
