"""DP then IMP: Distilled Pruning's rounds up to ``dp.switch_sparsity``, IMP's after it."""

from __future__ import annotations

from dp_jax.pruning import rounds as prune_lib
from dp_jax.methods import base, dp as dp_method, imp


class Hybrid(base.Method):
    """A stable mask from DP first, then IMP rounds on real data from it."""
    name = "dp_imp"
    title = "DP then IMP"
    options = (base.REWIND0,)
    needs_distilled = True
    needs_dp = True

    def label(self, opts):
        return f"dp_imp_k{opts['k']}"

    def validate(self, spec, config, earlier):
        p = config.prune
        if not 0 < config.dp.switch_sparsity < 1:  # switch_round would never end
            raise ValueError(f"config.dp.switch_sparsity={config.dp.switch_sparsity!r} is "
                             "invalid; allowed: a sparsity in (0, 1)")
        switch = prune_lib.switch_round(config.dp.switch_sparsity, p.fraction)
        if not switch < p.rounds:
            raise ValueError(
                f"config.dp.switch_sparsity={config.dp.switch_sparsity!r} is invalid; allowed: "
                f"a sparsity reached before the last round ({p.rounds} rounds of {p.fraction} "
                f"reach {prune_lib.sparsity_after(p.rounds, p.fraction):.3f})")

    def plan(self, spec, ctx):
        setup, k = ctx.setup, spec.rewind_step
        dp_plan = dp_method.METHOD.plan(spec, ctx)
        imp_mask = imp.magnitude_next_mask(setup)
        switch = prune_lib.switch_round(ctx.config.dp.switch_sparsity, setup.fraction)
        B = setup.trainer.batch_size

        def next_mask(rnd, mask, trained):
            return (dp_plan.next_mask if rnd <= switch else imp_mask)(rnd, mask, trained)

        def examples(rnd):
            if rnd <= switch:
                return dp_plan.search_examples(rnd)
            # IMP after the switch prunes the previous round's real training; with k > 0
            # the rewind point also needed the dense training.
            extra = setup.num_steps * B if (rnd == switch + 1 and k) else 0
            return (setup.num_steps - k) * B + extra
        return base.Plan(next_mask=next_mask, start_point=dp_plan.start_point,
                         search_examples=examples, uses_trained=lambda rnd: rnd > switch)


METHOD = Hybrid()
