"""The data control: IMP on a random real subset, with Distilled Pruning's inner loop.

``subset:n=N`` draws a stratified random subset of N real training images (once per seed)
and finds each round's mask exactly as DP does — the same ``dp`` inner loop (steps,
batch, DSA, schedule, inner seeds) on the masked init — with its own step size
``dp.subset_lr`` (0 = DP's: ``dp.lr``, or the distilled set's learned step size). So DP
vs ``subset`` is "distilled images vs as many real images". N defaults to the distilled
set's size when the experiment has one, else ``distill.ipc`` x classes.
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from dp_jax import rng
from dp_jax.training import small_set
from dp_jax.data import stratified_indices
from dp_jax.methods import base, dp as dp_method
from dp_jax.distill import load_distilled



def subset_size(spec, ctx) -> int:
    """N: the option, else the distilled set's size, else the size DP's set would have."""
    if spec.opt("n") is not None:
        return int(spec.opt("n"))
    if ctx.distilled is not None:
        return int(ctx.distilled.x.shape[0])
    return default_size(ctx.config, int(ctx.setup.num_classes))


def default_size(config, num_classes: int) -> int:
    """The distilled set's size: that of the file at ``distill.path`` when set, else
    ``distill.ipc`` x classes x ``distill.factor``**2 (multi-formation decodes each image)."""
    d = config.distill
    if d.path:
        if os.path.exists(d.path):
            return len(load_distilled(d.path))
    return int(d.ipc) * num_classes * int(d.factor) ** 2


def subset_lr(config, distilled_set) -> float:
    """The inner loop's step size: ``dp.subset_lr``, else DP's (``dp.lr`` or the learned one)."""
    d = config.dp
    if d.subset_lr > 0:
        return float(d.subset_lr)
    if d.lr > 0:
        return float(d.lr)
    if distilled_set is not None:
        return float(distilled_set.lr)
    raise ValueError("config.dp.subset_lr=0 needs Distilled Pruning's step size, but dp.lr=0 and "
                     "no distilled set is used; allowed: dp.subset_lr > 0 (or dp.lr > 0)")


class Subset(base.Method):
    """Mask search on N stratified random real images with DP's inner loop."""
    name = "subset"
    title = "Random real subset"
    options = (base.Option("n", base.bounded_int("n (real images in the subset)", 1),
                           default=None, help="subset size (default: the distilled set's size)"),)
    needs_dp = True

    def label(self, opts):
        return f"subset_n{opts['n']}" if opts.get("n") is not None else "subset"

    def describe(self, label):
        if label == "subset":
            return self.title
        if label.startswith("subset_n") and label[8:].isdigit():
            return f"{self.title} (n={label[8:]})"
        return None

    def validate(self, spec, config, earlier):
        if not (math.isfinite(config.dp.subset_lr) and config.dp.subset_lr >= 0):
            raise ValueError(f"config.dp.subset_lr={config.dp.subset_lr!r} is invalid; allowed: "
                             "0 (DP's step size) or a number > 0")

    def validate_with_data(self, spec, config, num_train, num_classes):
        n = spec.opt("n")
        if n is None:
            n = default_size(config, num_classes)
        if n is not None and not num_classes <= n <= num_train:
            raise ValueError(f"prune.method: subset:n={n} is invalid; allowed: at least one "
                             f"image for each of the {num_classes} classes and at most the "
                             f"{num_train} training images")

    def plan(self, spec, ctx):
        setup, cfg = ctx.setup, ctx.config
        n = subset_size(spec, ctx)
        pick = rng.fold(ctx.seed_key, rng.SUBSET, rng.SUBSET_PICK)
        idx = stratified_indices(np.asarray(setup.y_train), n, num_classes=setup.num_classes,
                                 seed=int(jax.random.randint(pick, (), 0, 2**31 - 1)))
        x, y = setup.x_train[jnp.asarray(idx)], setup.y_train[jnp.asarray(idx)]
        inner = small_set.setup_inner_train(setup, cfg.dp, subset_lr(cfg, ctx.distilled), n)
        next_mask = dp_method.small_set_next_mask(
            setup, inner, ctx.dense["variables"], x, y,
            rng.fold(ctx.seed_key, rng.SUBSET, rng.SUBSET_INNER), cfg.dp.inner_seeds)
        cost = dp_method.small_set_examples(cfg.dp, n)
        return base.Plan(next_mask=next_mask, start_point=base.rewind_start(ctx.dense, 0),
                         search_examples=lambda rnd: cost)


METHOD = Subset()
