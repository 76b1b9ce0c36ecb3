"""IMP with rewinding: prune the smallest surviving weights of the last trained network.

Round r's mask removes ``prune.fraction`` of round r-1's surviving weights by magnitude of
its *trained* weights; the survivors restart from the dense run's weights at step k
(``imp:k=STEP``; k = 0 is the original lottery-ticket procedure, k > 0 rewinding).
"""

from __future__ import annotations

from dp_jax import masks as masks_lib
from dp_jax.pruning import rounds as prune_lib
from dp_jax.methods import base


def magnitude_next_mask(setup):
    """Round r's mask: prune the smallest |w| of the previous round's trained weights."""
    def fn(rnd, mask, trained):
        return prune_lib.prune_step(setup, masks_lib.magnitude_scores(trained["params"]), mask)
    return fn


def real_training_examples(setup, rewind_step: int):
    """``round -> examples``: round 1's mask costs the dense training, later ones one from k."""
    B = setup.trainer.batch_size

    def fn(rnd):
        return setup.num_steps * B if rnd == 1 else (setup.num_steps - rewind_step) * B
    return fn


class IMP(base.Method):
    """Iterative magnitude pruning, rewound to step k."""
    name = "imp"
    title = "IMP"
    options = (base.REWIND,)

    def label(self, opts):
        return f"imp_k{opts['k']}"

    def plan(self, spec, ctx):
        return base.Plan(next_mask=magnitude_next_mask(ctx.setup),
                         start_point=base.rewind_start(ctx.dense, spec.rewind_step),
                         search_examples=real_training_examples(ctx.setup, spec.rewind_step),
                         uses_trained=lambda rnd: True)


METHOD = IMP()
