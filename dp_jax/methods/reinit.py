"""Re-initialisation: another run's mask of each round, trained from fresh random weights.

``reinit:of=LABEL`` (default ``imp_k0``) needs the run LABEL listed before it; it tells
whether a mask's value lies in its structure alone or in its pairing with the init.
"""

from __future__ import annotations

import jax

from dp_jax import rng
from dp_jax.methods import base, registry
from dp_jax.pruning.plan import REINIT


class Reinit(base.Method):
    """The source run's masks, every round from a fresh init of the seed's reinit key."""
    name = "reinit"
    title = "Re-init"
    options = (base.Option("of", str, default="imp_k0",
                           help="label of the run whose masks are re-initialised"),)

    def label(self, opts):
        return f"reinit_{opts['of']}"

    def describe(self, label):
        if label.startswith("reinit_"):
            return f"{self.title} of {registry.pretty(label[len('reinit_'):])}"
        return None

    def validate(self, spec, config, earlier):
        labels = [s.label for s in earlier]
        if spec.source not in labels:
            raise ValueError(f"prune.method: reinit:of={spec.source} needs the run "
                             f"{spec.source!r} listed before it; runs: {labels + [spec.label]}")

    def start(self, spec):
        return REINIT

    def plan(self, spec, ctx):
        fresh = ctx.setup.init_fn(jax.random.fold_in(ctx.seed_key, rng.REINIT))
        # The mask search is the source's: charge its examples round by round.
        mask_of, examples = base.source_masks(self.name, spec, ctx)
        return base.Plan(next_mask=lambda rnd, mask, trained: mask_of(rnd),
                         start_point=lambda rnd: (fresh, 0), search_examples=examples)

METHOD = Reinit()
