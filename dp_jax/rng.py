"""Every PRNG purpose in one table.

Each seed has one root key, ``jax.random.key(seed)``. Every consumer folds in its own
purpose below, so streams never overlap and adding a consumer never shifts another's
numbers. Sub-purposes are folded into their parent's key (e.g. the MTT iteration keys
are ``fold_in(fold_in(distill_key, MTT), it)``). The values are part of the results'
identity: changing one changes every run that uses it.
"""

from __future__ import annotations

import jax

# Purposes on a seed's root key.
INIT = 0          # the network's initial weights
DATA = 1          # real-data training order (and the first instability copy)
RANDOM_PRUNE = 2  # random pruning scores, one fold per round
REINIT = 3        # re-initialisation baseline's fresh weights
DISTILL = 4       # everything distillation does (sub-purposes below)
INNER = 5         # Distilled Pruning's inner loop, one fold per round
SCORE = 6         # SNIP/GraSP scoring minibatches, one fold per round
SUBSET = 7        # the random-real-subset control: the subset and its inner loop
SHUFFLE = 8       # the shuffled-mask control: one permutation per layer (folded by layer index)
ANALYSIS = 1000   # instability, Hessian and landscape analyses (sub-purposes below)

# Sub-purposes of DISTILL.
DISTILL_EXPERTS, DISTILL_MTT, DISTILL_EVAL, DISTILL_SYN_INIT = 0, 1, 2, 3
DISTILL_GM, DISTILL_DM = 4, 5  # gradient / distribution matching, one fold per iteration

# Sub-purposes of a gradient/distribution-matching iteration key (``fold(., DISTILL_GM, it)``):
# the iteration's fresh network, and one fold per outer loop (GM; DM has a single one).
MATCH_NET_INIT, MATCH_OUTER = 0, 1
# Sub-purposes of an outer-loop key: the real class batches, the per-class Siamese augmentation
# (one fold per class), the BatchNorm statistics batch, the network updates (one fold per step).
MATCH_REAL, MATCH_AUG, MATCH_BN, MATCH_NET_TRAIN = 0, 1, 2, 3

# Sub-purposes of SUBSET.
SUBSET_PICK, SUBSET_INNER = 0, 1
SUBSET_CORESET = 2  # coreset selection's probe networks: one fold per network (init, data order)

# Sub-purposes of ANALYSIS.
(ANALYSIS_COPIES, ANALYSIS_BN_BATCHES, ANALYSIS_HESSIAN_DATA, ANALYSIS_HESSIAN_PROBES,
 ANALYSIS_LANDSCAPE_DIRS, ANALYSIS_LANDSCAPE_DATA) = range(6)


def seed_key(seed: int) -> jax.Array:
    """The root key of seed ``seed``."""
    return jax.random.key(int(seed))


def key_for(seed: int, purpose: int, *sub: int) -> jax.Array:
    """``fold_in`` of ``purpose`` then each of ``sub`` into seed ``seed``'s root key."""
    return fold(seed_key(seed), purpose, *sub)


def fold(key: jax.Array, *purposes: int) -> jax.Array:
    """``key`` with each of ``purposes`` folded in, in order."""
    for p in purposes:
        key = jax.random.fold_in(key, p)
    return key
