"""Distilled Pruning: the IMP loop whose inner training runs on a distilled set.

Round r trains the masked init on the distilled images (``dp.steps`` SGD steps or
``dp.epochs`` epochs, DSA, optionally CutMix, the learned step size unless ``dp.lr`` is set;
the recipe is :class:`dp_jax.training.small_set.Recipe`) and prunes the smallest resulting |w|;
the evaluation of every mask still trains on the full real training set. The same
small-set search serves the random-real-subset control (:mod:`dp_jax.methods.subset`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dp_jax.pruning import rounds as prune_lib
from dp_jax import rng
from dp_jax.training import small_set
from dp_jax.methods import base
from dp_jax.training.outputs import TrainingDivergedError


def small_set_next_mask(setup, inner, variables: dict, x, y, key, num_inner_seeds: int):
    """Round r's mask: train the masked ``variables`` on ``(x, y)`` with ``inner``, prune by |w|.

    With several inner seeds the score is the mean magnitude over the seeds' trained
    weights (independent data orders and augmentations). ``key`` is the search's own key;
    round r folds in r.
    """
    def fn(rnd, mask, trained):
        keys = jax.random.split(jax.random.fold_in(key, rnd), num_inner_seeds)
        params, final_loss = inner(variables, mask, x, y, keys)
        loss = np.asarray(final_loss)
        if not np.all(np.isfinite(loss)):  # a diverged inner run would give a garbage mask
            raise TrainingDivergedError(
                f"the small-set inner loop diverged in round {rnd} (final loss {loss.tolist()}); "
                "lower dp.lr (or dp.subset_lr for the subset control)")
        scores = jax.tree.map(lambda p: jnp.mean(jnp.abs(p), axis=0), params)
        return prune_lib.prune_step(setup, scores, mask)
    return fn


def small_set_examples(dp_cfg, set_size: int) -> int:
    """Examples one round's small-set search processes: steps x batch x inner seeds."""
    recipe = small_set.Recipe.from_dp(dp_cfg, lr=1.0)  # the count does not depend on the lr
    return recipe.examples(set_size) * int(dp_cfg.inner_seeds)


class DistilledPruning(base.Method):
    """DP: masks from training on the distilled set, rewound to init."""
    name = "dp"
    title = "Distilled Pruning"
    options = (base.REWIND0,)
    needs_distilled = True
    needs_dp = True


    def plan(self, spec, ctx):
        x, y, inner = ctx.distilled.x, ctx.distilled.y, ctx.distilled.inner_train
        cfg = ctx.config.dp
        next_mask = small_set_next_mask(ctx.setup, inner, ctx.dense["variables"], x, y,
                                        jax.random.fold_in(ctx.seed_key, rng.INNER),
                                        cfg.inner_seeds)
        cost = small_set_examples(cfg, x.shape[0])
        return base.Plan(next_mask=next_mask,
                         start_point=base.rewind_start(ctx.dense, spec.rewind_step),
                         search_examples=lambda rnd: cost)


METHOD = DistilledPruning()
