"""GraSP (Wang et al. 2020): keep the weights whose removal least reduces gradient flow.

The score convention (sign, temperature) is documented in
:func:`dp_jax.methods.saliency.grasp_scores`.
"""

from __future__ import annotations

from dp_jax.methods import saliency, scored


class GraSP(scored.Scored):
    """Iterative GraSP by default; ``grasp:oneshot`` scores the dense init once;
    ``grasp:balanced`` scores class-balanced minibatches (as the authors' code draws them)."""
    name = "grasp"
    title = "GraSP"
    options = (scored.ONESHOT, scored.BALANCED)

    def score_fn(self, model, variables, mask, batches):
        return saliency.grasp_scores(model, variables, mask, batches)


METHOD = GraSP()
