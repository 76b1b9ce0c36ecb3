"""Coreset selection rules: which k examples of one class to keep (pure NumPy).

Each rule takes what a probe network measured on one class's examples (features, correctness
flags, logits) and returns the positions it picks; :func:`per_class` applies a rule class by
class. The networks themselves are trained elsewhere (``dp_jax.methods.subset``). Every tie is
broken by the lower position, so a selection depends only on its inputs.

* herding (Welling 2009, in the greedy form of iCaRL, Rebuffi et al. 2017, used by Dataset
  Condensation's coreset baselines): step t adds the example that brings the mean of the t
  chosen features closest to the class mean;
* k-center greedy (Sener & Savarese 2018): start from the example nearest the class mean (no
  random draw), then add the example farthest from its nearest chosen one;
* forgetting events (Toneva et al., ICLR 2019): the most forgotten examples first;
* EL2N (Paul et al., NeurIPS 2021): the mean L2 norm of softmax(logits) - onehot(y).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

SELECTIONS = ("random", "herding", "kcenter", "forgetting", "el2n_easy", "el2n_hard")
NOT_PRESENTED = -1  # a flags entry for an example that a presentation round skipped


def per_class(labels: np.ndarray, per: int, num_classes: int,
              pick: Callable[[np.ndarray, int], np.ndarray]) -> np.ndarray:
    """Sorted indices of ``per`` examples of every class: ``pick(class_indices, per)`` returns
    the positions (into ``class_indices``) it keeps; ValueError if a class has fewer than
    ``per``."""
    labels = np.asarray(labels)
    out = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        if idx.size < per:
            raise ValueError(f"class {c} has {idx.size} training examples, fewer than the "
                             f"{per} per class the coreset needs")
        out.append(idx[np.asarray(pick(idx, per), np.int64)])
    return np.sort(np.concatenate(out)).astype(np.int64) if out else np.zeros(0, np.int64)


def herding(features: np.ndarray, k: int) -> np.ndarray:
    """Positions of ``k`` rows of ``features`` (m, d) in the order greedy herding picks them.

    Step t picks ``argmin_i ||mu - (s + f_i) / t||`` over the rows not yet picked, with mu the
    mean of all rows and s the sum of the t-1 picked ones; with ``w = t mu - s`` that is
    ``argmin_i ||f_i||^2 - 2 f_i . w``.
    """
    f = np.asarray(features, np.float64)
    mu, s = f.mean(0), np.zeros(f.shape[1])
    sq = np.einsum("ij,ij->i", f, f)
    free = np.ones(len(f), bool)
    order = []
    for t in range(1, k + 1):
        cost = np.where(free, sq - 2.0 * (f @ (t * mu - s)), np.inf)
        i = int(np.argmin(cost))  # first minimum: the lower position wins a tie
        order.append(i)
        free[i] = False
        s += f[i]
    return np.asarray(order, np.int64)


def kcenter(features: np.ndarray, k: int) -> np.ndarray:
    """Positions of ``k`` rows in the order k-center greedy picks them: first the row nearest the
    mean, then repeatedly the row whose distance to its nearest picked row is largest."""
    f = np.asarray(features, np.float64)
    first = int(np.argmin(_sq_dist(f, f.mean(0))))
    order, nearest = [first], _sq_dist(f, f[first])
    for _ in range(k - 1):
        gap = nearest.copy()
        gap[order] = -np.inf  # duplicates of picked rows are at 0 too: never pick a row twice
        i = int(np.argmax(gap))
        order.append(i)
        nearest = np.minimum(nearest, _sq_dist(f, f[i]))
    return np.asarray(order, np.int64)


def _sq_dist(f: np.ndarray, v: np.ndarray) -> np.ndarray:
    d = f - v
    return np.einsum("ij,ij->i", d, d)


def forgetting_counts(flags: np.ndarray) -> np.ndarray:
    """Forgetting events per example from ``flags`` (presentations, n): 1 correct, 0 wrong,
    :data:`NOT_PRESENTED` skipped. An event is a presentation classified correctly followed by
    the example's next presentation misclassified (Toneva et al.). An example never classified
    correctly (never learned, or never presented) counts ``inf``, as Toneva et al. rank them."""
    flags = np.asarray(flags)
    counts = np.zeros(flags.shape[1])
    last = np.full(flags.shape[1], NOT_PRESENTED)
    for row in flags:
        seen = row != NOT_PRESENTED
        counts += seen & (last == 1) & (row == 0)
        last = np.where(seen, row, last)
    counts[~np.any(flags == 1, axis=0)] = np.inf
    return counts


def most_forgotten(flags: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` most forgotten examples (columns of ``flags``): by forgetting
    events, then by misclassified presentations (the harder first), then by position."""
    flags = np.asarray(flags)
    events, misses = forgetting_counts(flags), np.sum(flags == 0, axis=0)
    return np.lexsort((np.arange(flags.shape[1]), -misses, -events))[:k]


def el2n(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """EL2N scores: the mean over networks of ``||softmax(logits) - onehot(y)||_2``, from
    ``logits`` (networks, n, classes) and integer ``labels`` (n,)."""
    z = np.asarray(logits, np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    p[:, np.arange(z.shape[1]), np.asarray(labels)] -= 1.0
    return np.linalg.norm(p, axis=-1).mean(0)


def lowest(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` lowest scores (ties: lower position first)."""
    scores = np.asarray(scores)
    return np.lexsort((np.arange(scores.size), scores))[:k]


def highest(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` highest scores (ties: lower position first)."""
    scores = np.asarray(scores)
    return np.lexsort((np.arange(scores.size), -scores))[:k]
