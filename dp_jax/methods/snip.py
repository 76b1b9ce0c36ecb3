"""SNIP (Lee et al. 2019): connection sensitivity |dL/dw * w| at the (masked) init."""

from __future__ import annotations

from dp_jax.methods import saliency, scored


class SNIP(scored.Scored):
    """Iterative SNIP by default; ``snip:oneshot`` scores the dense init once."""
    name = "snip"
    title = "SNIP"

    def score_fn(self, model, variables, mask, batches):
        return saliency.snip_scores(model, variables, mask, batches)


METHOD = SNIP()
