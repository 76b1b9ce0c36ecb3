"""FORCE (de Jorge et al., "Progressive Skeletonization", ICLR 2021): pruning at init, iterated.

``force[:iters=N]`` (default 10, the default ``num_steps`` of the authors' ``iterative_pruning``,
``naver/force``, ``pruning/pruning_algos.py``). Round r goes from round r-1's mask m (density
d0) to IMP's next count (density d1 = d0 (1 - prune.fraction)) in N iterations; iteration t:

1. draws ``prune.score_batches`` fresh minibatches of ``train.batch_size`` real images (the
   seed's scoring key folded with the round, then with t; the authors take a fresh batch per
   gradient too);
2. scores every weight by ``|theta ⊙ ∂L/∂w|`` at ``w = theta ⊙ c_{t-1}`` (c_0 = m; theta the
   init): the gradient of the *sparsified* network with respect to its weights, which is not
   zero at pruned weights, times the original weights
   (:func:`dp_jax.methods.saliency.force_scores`);
3. keeps, among all of m's survivors, the best-scoring ``(1 - fraction)^(t/N)`` share
   (``prune.scope``, ``prune.layer_rates``, ``prune.min_per_layer`` as every round), i.e.
   density ``d_t = d0 (d1/d0)^(t/N)``; weights pruned at earlier iterations of the round can
   come back, those outside m cannot (masks nest across rounds).

With one round (or from the dense round 0) this is the authors' FORCE with the ``exp`` schedule,
``density_t = target^(t/N)`` for t = 1..N, up to the count: ``round`` here (ties by position),
``int(N * density)`` and ``score >= threshold`` there. BatchNorm runs in train mode (their net
is never put in eval mode while scoring). Every round trains from the init.
"""

from __future__ import annotations

import jax

from dp_jax import rng
from dp_jax.methods import base, saliency, scored
from dp_jax.pruning import rounds as prune_lib


class FORCE(base.Method):
    """Progressive FORCE: N re-scorings of the sparsified init per round."""
    name = "force"
    title = "FORCE"
    options = (base.Option("iters", base.bounded_int("iters (scoring iterations per round)", 1),
                           default=10, help="scoring iterations per round"),)

    def validate(self, spec, config, earlier):
        scored.Scored.validate(self, spec, config, earlier)  # score_batches, in-memory data

    def plan(self, spec, ctx):
        setup, variables = ctx.setup, ctx.dense["variables"]
        num, iters = int(ctx.config.prune.score_batches), int(spec.opt("iters"))
        key = jax.random.fold_in(ctx.seed_key, rng.SCORE)

        def next_mask(rnd, mask, trained):
            key_r = jax.random.fold_in(key, rnd)
            return saliency.force_prune(
                setup.model, variables, mask,
                lambda t: scored.score_batches(setup, jax.random.fold_in(key_r, t), num),
                fraction=setup.fraction, iters=iters,
                prune_fn=lambda s, m, p: prune_lib.prune_step(setup, s, m, fraction=p))
        cost = iters * num * setup.trainer.batch_size
        return base.Plan(next_mask=next_mask, start_point=base.rewind_start(ctx.dense, 0),
                         search_examples=lambda rnd: cost)


METHOD = FORCE()
