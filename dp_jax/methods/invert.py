"""Inverted scores: keep the weights a scoring method would remove first.

``invert:of=LABEL`` is the "inversion" check of Frankle et al., ICLR 2021 ("Pruning Neural
Networks at Initialization: Why are We Missing the Mark?", Sec. 5): if a method's scores mean
anything, pruning the *highest*-scored weights instead must hurt. The source LABEL, listed
before, must be a method with scores: IMP (|w| after training), magnitude at init, SynFlow, or
a gradient-scored method (SNIP, GraSP, any :class:`~dp_jax.methods.scored.Scored`).

Which ranking is inverted: each round re-scores the inverted run's *own* mask with the source's
own scoring (the same scoring minibatches as the source's round r for SNIP/GraSP; the inverted
run's own trained weights for IMP; every SynFlow iteration) and prunes ``prune.fraction`` of its
survivors with the *highest* scores. Why, rather than inverting the source's per-round ranking:
an iterative method's round-r scores are those of its own round-(r-1) mask, so the paper's
inversion (one shot, at init) carried to rounds is "score the current mask, remove the top";
masks stay nested and follow IMP's schedule, and the inversion is the only change from the
source. Round 1 (the dense network for both) and every round of a one-shot source
(``snip:oneshot``, ``mag_init``) are exactly the complement ranking of the source's scores.

Sign: dp_jax's scores mean "higher = keep" and GraSP's are θ ⊙ Hg (GraSP removes the largest
−θ ⊙ Hg, i.e. the smallest θ ⊙ Hg; :func:`dp_jax.methods.saliency.grasp_scores`). Inversion
negates them for every source, so inverted GraSP keeps exactly what GraSP would remove first
(the smallest θ ⊙ Hg) and removes what GraSP keeps. Ties are broken by position, as for
every mask (:func:`dp_jax.masks.prune`). Training starts from the source's start point.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dp_jax import masks as masks_lib
from dp_jax import rng
from dp_jax.methods import base, imp, mag_init, registry, saliency, scored, shuffle, synflow
from dp_jax.pruning import rounds as prune_lib


def _negate(scores):
    return jax.tree.map(jnp.negative, scores)


def _imp(method, src, ctx, prune):
    """IMP: the inverted run's own previous training, its largest |w| removed."""
    return (lambda rnd, mask, trained: prune(masks_lib.magnitude_scores(trained["params"]), mask),
            imp.real_training_examples(ctx.setup, src.rewind_step), lambda rnd: True)


def _mag_init(method, src, ctx, prune):
    """Magnitude at init: the largest |w| of the init removed."""
    scores = masks_lib.magnitude_scores(ctx.dense["variables"]["params"])
    return lambda rnd, mask, trained: prune(scores, mask), lambda rnd: 0, None


def _synflow(method, src, ctx, prune):
    """SynFlow: every one of the round's iterations removes the highest synaptic flow."""
    setup, variables = ctx.setup, ctx.dense["variables"]
    prune_fn = synflow.experiment_prune_fn(setup)

    def inverted(scores, mask, fraction, *, scope):
        return prune_fn(_negate(scores), mask, fraction, scope=scope)

    def next_mask(rnd, mask, trained):
        alive, total = masks_lib.count(mask)
        target = alive - int(round(setup.fraction * alive))  # what one IMP round keeps
        return saliency.synflow_prune(setup.model, variables, mask, setup.image_shape,
                                      target_density=target / total, iters=int(src.opt("iters")),
                                      scope=setup.scope, prune_fn=inverted)
    return next_mask, lambda rnd: 0, None


def _scored(method, src, ctx, prune):
    """SNIP, GraSP (any Scored method): its score_fn on the source's round-r minibatches."""
    setup, variables = ctx.setup, ctx.dense["variables"]
    num = int(ctx.config.prune.score_batches)
    key = jax.random.fold_in(ctx.seed_key, rng.SCORE)  # the source's key: the same batches
    oneshot, cache = bool(src.opt("oneshot")), {}

    def scores_at(rnd, mask):
        batches = scored.score_batches(setup, jax.random.fold_in(key, rnd), num)
        return method.score_fn(setup.model, variables, mask, batches)

    def next_mask(rnd, mask, trained):
        if not oneshot:
            return prune(scores_at(rnd, mask), mask)
        if "dense" not in cache:  # also after a resume: the dense init's scores
            cache["dense"] = scores_at(1, jax.tree.map(lambda m: np.ones(np.shape(m), bool), mask))
        return prune(cache["dense"], mask)
    cost = num * setup.trainer.batch_size
    return next_mask, lambda rnd: cost if (rnd == 1 or not oneshot) else 0, None


# Exact classes: a subclass (say, IMP with learning-rate rewinding) may rank by something else
# and must be added on purpose. Scored subclasses all rank by their score_fn.
_BY_CLASS = {imp.IMP: _imp, mag_init.MagnitudeAtInit: _mag_init, synflow.SynFlow: _synflow}


def _builder(method: base.Method):
    if isinstance(method, scored.Scored):
        return _scored
    return _BY_CLASS.get(type(method))


def allowed_sources() -> list[str]:
    """Names of the registered methods whose scores can be inverted."""
    return [name for name, m in registry.REGISTRY.items() if _builder(m) is not None]


def source_builder(src):
    """``(method, builder)`` of the source spec ``src``; ValueError naming the allowed ones."""
    method = registry.get(src.name)
    builder = _builder(method)
    if builder is None:
        raise ValueError(f"prune.method: invert:of={src.label}: {src.name!r} has no scores to "
                         f"invert; allowed sources: runs of {', '.join(allowed_sources())}")
    return method, builder


class Invert(base.Method):
    """The source's scores, re-computed each round on this run's mask; the highest pruned."""
    name = "invert"
    title = "Inverted"
    options = (shuffle.source_option("scores are inverted"),)

    def label(self, opts):
        return f"invert_{opts['of']}" if opts.get("of") else self.name

    def describe(self, label):
        return shuffle.describe_of(self, label, self.title)

    def validate(self, spec, config, earlier):
        src = shuffle.check_source(spec, earlier)
        source_builder(src)
        shuffle.check_start(spec, src, self.start(spec))

    def start(self, spec):
        return shuffle.source_start(spec)

    def plan(self, spec, ctx):
        src = next((s for s in ctx.config.specs if s.label == spec.source), None)
        if src is None:
            raise ValueError(f"invert:of={spec.source} needs the run {spec.source!r} in "
                             "prune.method")
        method, builder = source_builder(src)

        def prune(scores, mask):  # remove the highest scores: the lowest of their negation
            return prune_lib.prune_step(ctx.setup, _negate(scores), mask)
        next_mask, examples, uses_trained = builder(method, src, ctx, prune)
        next_mask, start_point = shuffle.from_start(self.start(spec), ctx, next_mask)
        return base.Plan(next_mask=next_mask, start_point=start_point, search_examples=examples,
                         uses_trained=uses_trained or (lambda rnd: False))


METHOD = Invert()
