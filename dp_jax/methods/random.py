"""Random pruning: the same per-round schedule with random masks (a lower bound).

``random[:dist=D]`` says how each round's kept weights are spread over the prunable layers:

* ``global`` (the default; label ``random``): i.i.d. uniform scores pruned like any other
  method (``prune.scope``, ``prune.layer_rates``, ``prune.min_per_layer``): one random
  threshold, so every layer keeps about the same fraction.
* ``erk`` (label ``random_erk``): Erdős–Rényi-Kernel densities (Evci et al. 2020, RigL): layer
  l with kernel shape (kh, kw, n_in, n_out) — (n_in, n_out) for a dense layer — has density
  ``d_l = eps * (kh + kw + n_in + n_out) / (kh * kw * n_in * n_out)`` (``sum(shape) /
  prod(shape)``), eps chosen so that ``sum_l d_l * n_l`` is the round's kept count K. A layer
  whose ``d_l`` would exceed 1 is set dense and removed from the pool, and eps recomputed from
  ``K - (its weights)``; the layers with the largest ratio go first, one ratio at a time, until
  no density exceeds 1 (the loop of RigL's ``sparse_utils.get_sparsities_erdos_renyi``).
* ``uniform`` (label ``random_uniform``): every layer at the same density K / N.

For ``erk`` and ``uniform`` the distribution replaces ``prune.scope``. K is what one IMP round
keeps of the pooled layers: ``alive - round(prune.fraction * alive)``. Layers named in
``prune.layer_rates`` keep their own schedule (``rate * prune.fraction`` of their survivors
per round, as :func:`dp_jax.masks.prune` prunes them) and stay out of the pool, as RigL leaves
its custom-sparsity layers out of the ERK budget. The real per-layer targets ``d_l * n_l`` are
rounded to integers that sum to exactly K (largest remainder first; RigL floors each layer's
zeros instead), each layer kept between ``min(prune.min_per_layer, alive_l)`` and its survivors
``alive_l``. Masks nest: round r keeps, in each layer, a uniformly random subset of round
r-1's survivors of exactly the layer's count (the highest of fresh uniform scores, drawn from
the seed's random-pruning key folded with the round), so the densities are the distribution's
at every round. Non-prunable parameters (biases, norms) are never pruned.
"""

from __future__ import annotations

import math

import jax
import numpy as np

from dp_jax import masks as masks_lib
from dp_jax.pruning import rounds as prune_lib
from dp_jax import rng
from dp_jax.methods import base

DISTS = ("global", "erk", "uniform")


def _dist(value: str) -> str:
    if value not in DISTS:
        raise ValueError(f"dist must be one of {', '.join(DISTS)}, got {value!r}")
    return value


DIST = base.Option("dist", _dist, default="global",
                   help="how each round's kept weights are spread over the layers")


def erk_densities(shapes: dict, kept: float, *, uniform: bool = False) -> dict:
    """``{layer: density}`` keeping ``kept`` of the layers' weights, ERK-distributed (or
    uniformly), layers whose density would exceed 1 dense (RigL's iterative loop)."""
    n = {k: math.prod(s) for k, s in shapes.items()}
    if kept >= sum(n.values()):
        return {k: 1.0 for k in n}
    raw = {k: 1.0 if uniform else sum(s) / math.prod(s) for k, s in shapes.items()}
    dense: set = set()
    while True:
        pool = [k for k in n if k not in dense]
        eps = (kept - sum(n[k] for k in dense)) / sum(raw[k] * n[k] for k in pool)
        top = max(raw[k] for k in pool)
        if eps * top <= 1.0:
            return {k: 1.0 if k in dense else eps * raw[k] for k in n}
        dense |= {k for k in pool if raw[k] == top}


def apportion(targets: dict, lo: dict, hi: dict, total: int) -> dict:
    """Integers ``c_k`` in ``[lo_k, hi_k]`` summing to ``total`` (at least ``sum(lo)``), each
    near the real ``targets[k]``: floors first, then +1 by largest remainder (ties: first
    layer), or -1 from the most over target when the lower bounds overshoot."""
    keys = list(targets)
    c = {k: min(max(math.floor(targets[k]), lo[k]), hi[k]) for k in keys}
    total = max(int(total), sum(lo.values()))
    if total > sum(hi.values()):
        raise ValueError(f"cannot keep {total} weights in layers holding {sum(hi.values())}")
    while sum(c.values()) < total:
        k = max((k for k in keys if c[k] < hi[k]), key=lambda k: targets[k] - c[k])
        c[k] += 1
    while sum(c.values()) > total:
        k = min((k for k in keys if c[k] > lo[k]), key=lambda k: targets[k] - c[k])
        c[k] -= 1
    return c


def layer_counts(mask, setup, dist: str) -> dict:
    """``{prunable path: weights kept}`` of the round after ``mask`` (see the module doc)."""
    leaves = {k: np.asarray(v, bool) for k, v in masks_lib.prunable_leaves(mask).items()}
    alive = {k: int(v.sum()) for k, v in leaves.items()}
    lo = {k: min(setup.min_per_layer, a) for k, a in alive.items()}
    rates = masks_lib.resolve_layer_rates(setup.layer_rates, mask)
    counts = {k: max(alive[k] - int(round(setup.fraction * r * alive[k])), lo[k])
              for k, r in rates.items()}
    pool = [k for k in leaves if k not in rates]
    if pool:
        pool_alive = sum(alive[k] for k in pool)
        kept = pool_alive - int(round(setup.fraction * pool_alive))
        dens = erk_densities({k: leaves[k].shape for k in pool}, kept,
                             uniform=dist == "uniform")
        targets = {k: dens[k] * leaves[k].size for k in pool}
        counts.update(apportion(targets, {k: lo[k] for k in pool},
                                {k: alive[k] for k in pool}, kept))
    return counts


def keep_random(scores, mask, counts: dict, on_empty_layer: str = "warn"):
    """``mask`` with, in each prunable layer, its ``counts[layer]`` highest-scoring survivors."""
    s_leaves = masks_lib.prunable_leaves(scores)
    new = {}
    for k, m in masks_lib.prunable_leaves(mask).items():
        m = np.asarray(m, bool).reshape(-1)
        idx = np.flatnonzero(m)
        s = np.asarray(s_leaves[k], np.float64).reshape(-1)[idx]
        order = np.lexsort((idx, -s))  # highest score first, ties by position
        keep = np.zeros_like(m)
        keep[idx[order[:counts[k]]]] = True
        new[k] = keep.reshape(np.shape(s_leaves[k]))
    masks_lib.check_connected(new, on_empty_layer)
    return masks_lib.replace_prunable(mask, new)


class Random(base.Method):
    """Random masks drawn each round from the seed's random-pruning key."""
    name = "random"
    title = "Random pruning"
    options = (base.REWIND0, DIST)
    data_free = True

    def label(self, opts):
        dist = opts.get("dist", "global")
        return self.name if dist == "global" else f"{self.name}_{dist}"

    def describe(self, label):
        names = {f"{self.name}_erk": "ERK", f"{self.name}_uniform": "uniform"}
        if label in names:
            return f"{self.title} ({names[label]})"
        return super().describe(label)

    def plan(self, spec, ctx):
        key = jax.random.fold_in(ctx.seed_key, rng.RANDOM_PRUNE)
        dist, setup = spec.opt("dist", "global"), ctx.setup

        def next_mask(rnd, mask, trained):
            scores = masks_lib.random_scores(trained["params"], jax.random.fold_in(key, rnd))
            if dist == "global":
                return prune_lib.prune_step(setup, scores, mask)
            return keep_random(scores, mask, layer_counts(mask, setup, dist),
                               setup.on_empty_layer)
        return base.Plan(next_mask=next_mask,
                         start_point=base.rewind_start(ctx.dense, spec.rewind_step),
                         search_examples=lambda rnd: 0)


METHOD = Random()
