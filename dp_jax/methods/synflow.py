"""SynFlow (Tanaka et al. 2020): data-free pruning by synaptic flow, iterated.

Each round goes from the previous round's density d0 to IMP's next density d1 in
``synflow:iters=N`` steps (default 100) on the paper's exponential schedule
d_i = d0 (d1/d0)^(i/N), re-scoring the current mask at every step
(:func:`dp_jax.methods.saliency.synflow_prune`; the last step lands on exactly the count one IMP
round keeps). The scores (:func:`dp_jax.methods.saliency.synflow_scores`) run in float64 so that R
does not overflow in deep nets.
"""

from __future__ import annotations

from dp_jax import masks as masks_lib
from dp_jax.methods import base, saliency


def experiment_prune_fn(setup):
    """``masks.prune`` with the experiment's settings, for one-layer sub-trees too."""
    def fn(scores, mask, fraction, *, scope):
        names = set(masks_lib.layer_names(mask)) | set(masks_lib.prunable_leaves(mask))
        rates = {k: v for k, v in setup.layer_rates.items() if k in names}
        return masks_lib.prune(scores, mask, fraction, scope=scope,
                               on_empty_layer=setup.on_empty_layer, layer_rates=rates,
                               min_per_layer=setup.min_per_layer)
    return fn


class SynFlow(base.Method):
    """Iterative synaptic-flow pruning on an all-ones input (no data)."""
    name = "synflow"
    title = "SynFlow"
    options = (base.Option("iters", base.bounded_int("iters (scoring iterations per round)", 1),
                           default=100, help="scoring iterations per round"),)
    data_free = True

    def plan(self, spec, ctx):
        setup, variables = ctx.setup, ctx.dense["variables"]
        iters, prune_fn = int(spec.opt("iters")), experiment_prune_fn(setup)

        def next_mask(rnd, mask, trained):
            alive, total = masks_lib.count(mask)
            target = alive - int(round(setup.fraction * alive))  # what one IMP round keeps
            return saliency.synflow_prune(setup.model, variables, mask, setup.image_shape,
                                          target_density=target / total, iters=iters,
                                          scope=setup.scope, prune_fn=prune_fn)
        return base.Plan(next_mask=next_mask, start_point=base.rewind_start(ctx.dense, 0),
                         search_examples=lambda rnd: 0)


METHOD = SynFlow()
