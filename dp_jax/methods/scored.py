"""Shared machinery of the gradient-based pruning-at-init methods (SNIP, GraSP).

Both score the masked init on ``prune.score_batches`` real minibatches of
``train.batch_size`` images, drawn afresh each round from the seed's scoring key. By
default they are iterative (re-scored at each round's mask, reaching IMP's sparsity
schedule); with the ``oneshot`` option the dense init is scored once and each round
prunes to its sparsity by those scores (masks stay nested).
"""

from __future__ import annotations

import jax
import numpy as np

from dp_jax.pruning import rounds as prune_lib
from dp_jax import rng
from dp_jax.methods import base

ONESHOT = base.Option("oneshot", flag=True, default=False,
                      help="score the dense init once instead of every round's masked init")
BALANCED = base.Option("balanced", flag=True, default=False,
                       help="score class-balanced minibatches (train.batch_size // classes "
                            "images of every class), as GraSP's authors draw theirs")


def balanced_size(batch_size: int, num_classes: int) -> int:
    """Images in a class-balanced score batch: ``batch_size`` rounded down to a multiple of
    the classes (12 of each of 10 classes for 128)."""
    return (batch_size // num_classes) * num_classes


def score_batches(setup, key, num_batches: int, *, balanced: bool = False) -> list:
    """``num_batches`` distinct random minibatches ``(x, y)`` of the real training set;
    ``balanced``: each holds ``batch_size // classes`` images of every class (the first of
    each class in the same permutation), in class order."""
    B = setup.trainer.batch_size
    y = np.asarray(setup.y_train)
    n = int(y.shape[0])
    perm = np.asarray(jax.random.permutation(key, n))
    if not balanced:
        if num_batches * B > n:  # more than one pass: draw further permutations
            extra = [np.asarray(jax.random.permutation(jax.random.fold_in(key, i), n))
                     for i in range(1, -(-num_batches * B // n))]
            perm = np.concatenate([perm] + extra)
        idx = [perm[i * B:(i + 1) * B] for i in range(num_batches)]
    else:
        classes = setup.num_classes
        per = B // classes
        by_class = [perm[y[perm] == c] for c in range(classes)]
        short = [c for c, ix in enumerate(by_class) if len(ix) < per * num_batches]
        if short:
            raise ValueError(f"balanced score batches need {per * num_batches} images of every "
                             f"class; classes {short} have fewer")
        idx = [np.concatenate([ix[i * per:(i + 1) * per] for ix in by_class])
               for i in range(num_batches)]
    return [(setup.x_train[i], setup.y_train[i]) for i in idx]


def validate_score_batches(config) -> None:
    """``prune.score_batches`` is an integer >= 1."""
    v = config.prune.score_batches
    if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
        raise ValueError(f"config.prune.score_batches={v!r} is invalid; allowed: an integer >= 1")


class Scored(base.Method):
    """A method whose round-r scores come from ``score_fn(model, variables, mask, batches)``."""
    options = (ONESHOT,)

    def score_fn(self, model, variables, mask, batches):
        """Params-shaped scores (higher = keep)."""
        raise NotImplementedError

    def label(self, opts):
        return (self.name + ("_oneshot" if opts.get("oneshot") else "")
                + ("_balanced" if opts.get("balanced") else ""))

    def describe(self, label):
        rest = label[len(self.name):] if label.startswith(self.name) else None
        words = {"": [], "_oneshot": ["one-shot"], "_balanced": ["class-balanced batch"],
                 "_oneshot_balanced": ["one-shot", "class-balanced batch"]}
        if rest in words:
            return self.title + (f" ({', '.join(words[rest])})" if words[rest] else "")
        return super().describe(label)

    def validate(self, spec, config, earlier):
        validate_score_batches(config)
        if config.data.pipeline == "stream":
            raise ValueError(f"config.data.pipeline='stream' is invalid for {spec.name}; "
                             "allowed: memory (its scores read training minibatches)")

    def validate_with_data(self, spec, config, num_train, num_classes):
        B = config.train.batch_size
        if spec.opt("balanced") and B < num_classes:
            raise ValueError(f"prune.method: {spec.name}:balanced needs train.batch_size={B} "
                             f">= the {num_classes} classes (one image of each at least)")

    def plan(self, spec, ctx):
        setup, variables = ctx.setup, ctx.dense["variables"]
        num = int(ctx.config.prune.score_batches)
        key = jax.random.fold_in(ctx.seed_key, rng.SCORE)
        oneshot, balanced = bool(spec.opt("oneshot")), bool(spec.opt("balanced"))
        cost = num * (balanced_size(setup.trainer.batch_size, setup.num_classes) if balanced
                      else setup.trainer.batch_size)
        cache = {}

        def scores_at(rnd, mask):
            batches = score_batches(setup, jax.random.fold_in(key, rnd), num, balanced=balanced)
            return self.score_fn(setup.model, variables, mask, batches)

        def next_mask(rnd, mask, trained):
            if oneshot:
                if "dense" not in cache:  # also after a resume: the dense init's scores
                    dense_mask = jax.tree.map(lambda m: np.ones(np.shape(m), bool), mask)
                    cache["dense"] = scores_at(1, dense_mask)
                return prune_lib.prune_step(setup, cache["dense"], mask)
            return prune_lib.prune_step(setup, scores_at(rnd, mask), mask)
        return base.Plan(next_mask=next_mask, start_point=base.rewind_start(ctx.dense, 0),
                         search_examples=lambda rnd: cost if (rnd == 1 or not oneshot) else 0)
