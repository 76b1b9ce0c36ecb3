"""SynFlow (Tanaka et al. 2020): data-free pruning by synaptic flow, iterated.

Each round goes from the previous round's density d0 to IMP's next density d1 in
``synflow:iters=N`` steps (default 100) on the paper's exponential schedule
d_i = d0 (d1/d0)^(i/N): every step re-scores the current mask and prunes to d_i; the last
step lands on exactly the count one IMP round would keep. Scores are computed by
:func:`dp_jax.saliency.synflow_scores` (its docstring states how overflow is avoided).
"""

from __future__ import annotations

from dp_jax import masks as masks_lib
from dp_jax import prune as prune_lib
from dp_jax.methods import base


class SynFlow(base.Method):
    """Iterative synaptic-flow pruning on an all-ones input (no data)."""
    name = "synflow"
    title = "SynFlow"
    options = (base.Option("iters", base.bounded_int("iters (scoring iterations per round)", 1),
                           default=100, help="scoring iterations per round"),)
    data_free = True

    def plan(self, spec, ctx):
        from dp_jax import saliency
        setup, variables = ctx.setup, ctx.dense["variables"]
        iters = int(spec.opt("iters"))

        def next_mask(rnd, mask, trained):
            alive, _ = masks_lib.count(mask)
            target = alive - int(round(setup.fraction * alive))  # what one IMP round keeps
            step = 1.0 - (target / alive) ** (1.0 / iters) if alive else 0.0
            for i in range(iters):
                now, _ = masks_lib.count(mask)
                # The last step prunes exactly to the round's count; earlier ones geometrically.
                n = now - target if i == iters - 1 else int(round(step * now))
                if n <= 0:
                    continue
                s = saliency.synflow_scores(setup.model, variables, mask, setup.image_shape)
                mask = prune_lib.prune_step(setup, s, mask, fraction=n / now)
            return mask
        return base.Plan(next_mask=next_mask, start_point=base.rewind_start(ctx.dense, 0),
                         search_examples=lambda rnd: 0)


METHOD = SynFlow()
