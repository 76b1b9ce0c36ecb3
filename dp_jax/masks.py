"""Pruning masks as pytrees that mirror the parameter pytree.

A mask has exactly the structure of ``params``. Prunable leaves (conv and dense
kernels, see :func:`dp_jax.models.is_prunable`) carry boolean arrays; every other
leaf (biases, normalisation scales) is an all-True array so that ``params * mask``
is valid everywhere and those parameters are never pruned.

Pruning removes a fraction of the weights that are *still unpruned*, either with
one global threshold across all prunable layers or per layer. Ties in the score
are broken deterministically by flat position (earlier positions go first), so a
mask never depends on sort stability or on the backend.
"""

from __future__ import annotations

import io
import math

import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dp_jax.models import is_prunable
from dp_jax.storage import atomic, npz

PyTree = Any


def path_str(path) -> str:
    """'/'-joined parameter path, e.g. ``Dense_0/kernel``."""
    parts = []
    for p in path:
        if hasattr(p, "key"):
            parts.append(str(p.key))
        elif hasattr(p, "idx"):
            parts.append(str(p.idx))
        elif hasattr(p, "name"):
            parts.append(str(p.name))
        else:
            parts.append(str(p))
    return "/".join(parts)


def ones_like(params: PyTree) -> PyTree:
    """The dense mask: all-True boolean arrays shaped like ``params``."""
    return jax.tree.map(lambda x: jnp.ones(jnp.shape(x), dtype=bool), params)


def apply(params: PyTree, mask: PyTree) -> PyTree:
    """Zero the pruned entries of ``params`` (keeps dtypes)."""
    return jax.tree.map(lambda p, m: jnp.where(m, p, jnp.zeros_like(p)), params, mask)


def prunable_leaves(tree: PyTree) -> dict[str, Any]:
    """Ordered ``{path: leaf}`` of the prunable leaves of a params-shaped tree."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    out = {}
    for path, leaf in flat:
        names = tuple(path_str((p,)) for p in path)
        if is_prunable(names, leaf):
            out["/".join(names)] = leaf
    return out


def _rank_keep(scores: np.ndarray, alive: np.ndarray, n_prune: int) -> np.ndarray:
    """Remove the ``n_prune`` lowest-scoring alive entries; ties by flat position."""
    flat_s = scores.reshape(-1)
    flat_a = alive.reshape(-1)
    idx = np.flatnonzero(flat_a)
    n_prune = int(min(max(n_prune, 0), idx.size))
    keep = flat_a.copy()
    if n_prune:
        # lexsort: last key is primary -> sort by score, then by position.
        order = np.lexsort((idx, flat_s[idx]))
        keep[idx[order[:n_prune]]] = False
    return keep.reshape(alive.shape)


def layer_names(tree: PyTree) -> list[str]:
    """Names of the prunable layers of a params-shaped tree (paths without ``/kernel``)."""
    return [k[:-len("/kernel")] if k.endswith("/kernel") else k for k in prunable_leaves(tree)]


def parse_layer_rates(text) -> dict:
    """``prune.layer_rates`` (``'Dense_2=0.5,Conv_0=0.8'``) as ``{layer: rate}``; a ValueError
    names the field and the allowed values."""
    out = {}
    for item in [t.strip() for t in str(text or "").split(",") if t.strip()]:
        name, eq, value = item.partition("=")
        try:
            rate = float(value) if eq else float("nan")
        except ValueError:
            rate = float("nan")
        if not (name.strip() and math.isfinite(rate) and 0 < rate <= 1):
            raise ValueError(f"config.prune.layer_rates={text!r} is invalid; allowed: "
                             "comma-separated LAYER=RATE with rates in (0, 1] (multiples of "
                             "prune.fraction)")
        out[name.strip()] = rate
    return out


def resolve_layer_rates(rates: dict[str, float], tree: PyTree) -> dict[str, float]:
    """``{prunable path: rate}`` from ``{layer name or path: rate}``; checks names and ranges.

    Raises ValueError naming ``prune.layer_rates``, the valid layer names and the allowed range.
    """
    paths = list(prunable_leaves(tree))
    names = dict(zip(layer_names(tree), paths))
    out = {}
    for name, rate in rates.items():
        path = names.get(name, name if name in paths else None)
        if path is None:
            raise ValueError(f"config.prune.layer_rates: unknown layer {name!r}; "
                             f"valid layers: {', '.join(names)}")
        if not (isinstance(rate, (int, float)) and 0 < rate <= 1):
            raise ValueError(f"config.prune.layer_rates: rate {rate!r} of {name!r} is invalid; "
                             "allowed: a number in (0, 1] (a multiple of prune.fraction)")
        out[path] = float(rate)
    return out


def prune(scores: PyTree, mask: PyTree, fraction: float, *, scope: str = "global",
          on_empty_layer: str = "warn", layer_rates: dict[str, float] | None = None,
          min_per_layer: int = 0) -> PyTree:
    """Prune ``fraction`` of the remaining prunable weights with the lowest scores.

    Args:
      scores: params-shaped tree of scores (e.g. ``|theta|``); only prunable leaves
        are read.
      mask: current mask (params-shaped, boolean).
      fraction: fraction of the *currently unpruned* prunable weights to remove,
        in (0, 1). The count is ``round(fraction * alive)`` (globally or per layer).
      scope: ``"global"`` (one threshold across all prunable layers) or
        ``"layerwise"`` (the same fraction in every layer).
      on_empty_layer: ``"warn"``, ``"error"`` or ``"ignore"`` when a prunable layer
        would lose all its weights (the network then cannot pass signal).
      layer_rates: ``{layer name or path: rate}``: those layers are pruned on their own at
        ``rate * fraction`` of their remaining weights (e.g. the output layer at half the
        rate, as in the lottery-ticket papers); the others as ``scope`` says.
      min_per_layer: every layer keeps at least this many weights (or all it has, when it
        has fewer): its highest-scoring ones are kept back, so no layer can collapse.

    Returns:
      The new mask; pruned entries stay pruned (masks are nested).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"prune fraction must be in (0, 1), got {fraction}")
    if scope not in ("global", "layerwise"):
        raise ValueError(f"prune scope must be 'global' or 'layerwise', got {scope!r}")
    if on_empty_layer not in ("warn", "error", "ignore"):
        raise ValueError("on_empty_layer must be 'warn', 'error' or 'ignore', "
                         f"got {on_empty_layer!r}")
    s_leaves = {k: np.asarray(v, dtype=np.float64) for k, v in prunable_leaves(scores).items()}
    m_leaves = {k: np.asarray(v, dtype=bool) for k, v in prunable_leaves(mask).items()}
    if min_per_layer < 0:
        raise ValueError(f"min_per_layer must be >= 0, got {min_per_layer}")
    rates = resolve_layer_rates(layer_rates or {}, mask)
    new = {}
    own = [k for k in m_leaves if scope == "layerwise" or k in rates]
    for k in own:
        alive = int(m_leaves[k].sum())
        n = int(round(fraction * rates.get(k, 1.0) * alive))
        new[k] = _rank_keep(s_leaves[k], m_leaves[k], n)
    keys = [k for k in m_leaves if k not in own]
    if keys:
        cat_s = np.concatenate([s_leaves[k].reshape(-1) for k in keys])
        cat_a = np.concatenate([m_leaves[k].reshape(-1) for k in keys])
        keep = _rank_keep(cat_s, cat_a, int(round(fraction * cat_a.sum())))
        off = 0
        for k in keys:
            n = m_leaves[k].size
            new[k] = keep[off:off + n].reshape(m_leaves[k].shape)
            off += n
    for k, v in new.items():
        # The collapse guard: keep a layer's top-scoring weights back up to the minimum.
        alive = int(m_leaves[k].sum())
        need = min(int(min_per_layer), alive)
        if int(v.sum()) < need:
            new[k] = _rank_keep(s_leaves[k], m_leaves[k], alive - need)
    check_connected(new, on_empty_layer)
    return replace_prunable(mask, new)


def check_connected(new: dict[str, np.ndarray], on_empty_layer: str) -> None:
    """``prune.on_empty_layer`` for new per-layer masks ``{path: bool array}``: an error or a
    warning naming the layers that lost every weight (``ignore``: nothing)."""
    empty = [k for k, v in new.items() if not v.any()]
    if empty and on_empty_layer != "ignore":
        msg = f"pruning removed every weight of layer(s) {empty}; the network is disconnected"
        if on_empty_layer == "error":
            raise ValueError(msg + " (set prune.on_empty_layer='warn' to allow it)")
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def replace_prunable(mask: PyTree, new: dict[str, np.ndarray]) -> PyTree:
    """``mask`` with its prunable leaves replaced by ``new`` (``{path: bool array}``)."""
    def repl(path, leaf):
        key = path_str(path)
        return jnp.asarray(new[key]) if key in new else leaf
    return jax.tree_util.tree_map_with_path(repl, mask)


def magnitude_scores(params: PyTree) -> PyTree:
    """Scores for magnitude pruning: ``|theta|``."""
    return jax.tree.map(jnp.abs, params)


@jax.jit  # one program for the whole tree: eager calls compiled one per leaf shape
def random_scores(params: PyTree, key: jax.Array) -> PyTree:
    """I.i.d. uniform scores (random pruning), one independent key per leaf."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(
        treedef, [jax.random.uniform(k, jnp.shape(x)) for k, x in zip(keys, leaves)])


def sparsity(mask: PyTree) -> float:
    """Fraction of prunable weights that are pruned."""
    leaves = [np.asarray(v) for v in prunable_leaves(mask).values()]
    total = sum(v.size for v in leaves)
    return float(sum(v.size - v.sum() for v in leaves) / max(total, 1))


def layer_sparsity(mask: PyTree) -> dict[str, float]:
    """Per prunable layer: fraction of its weights that are pruned."""
    return {k: float(1.0 - np.asarray(v).mean()) for k, v in prunable_leaves(mask).items()}


def count(mask: PyTree) -> tuple[int, int]:
    """(unpruned, total) prunable weights."""
    leaves = [np.asarray(v) for v in prunable_leaves(mask).values()]
    return int(sum(v.sum() for v in leaves)), int(sum(v.size for v in leaves))


def hamming(mask_a: PyTree, mask_b: PyTree) -> dict[str, float]:
    """Disagreement between two masks over prunable weights: Hamming fraction and IoU of kept sets."""
    a = np.concatenate([np.asarray(v).reshape(-1) for v in prunable_leaves(mask_a).values()])
    b = np.concatenate([np.asarray(v).reshape(-1) for v in prunable_leaves(mask_b).values()])
    if a.shape != b.shape:
        raise ValueError(f"masks have different sizes: {a.size} vs {b.size}")
    union = np.logical_or(a, b).sum()
    return {"hamming": float(np.mean(a != b)),
            "iou": float(np.logical_and(a, b).sum() / union) if union else 1.0}


def to_flat(mask: PyTree) -> dict[str, np.ndarray]:
    """``{'/'-joined path: bool array}`` for every leaf of the mask."""
    flat = jax.tree_util.tree_flatten_with_path(mask)[0]
    return {path_str(p): np.asarray(v, dtype=bool) for p, v in flat}


def from_flat(flat: dict[str, np.ndarray]) -> dict:
    """The nested mask of a :func:`to_flat` dict (the inverse, for masks read without a model)."""
    out: dict = {}
    for key, leaf in flat.items():
        *parents, name = key.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[name] = leaf
    return out


def save(path: str, mask: PyTree) -> None:
    """Write the mask to ``path`` (npz keyed by parameter path), atomically (process 0 only)."""
    if jax.process_index() != 0:
        return
    buf = io.BytesIO()
    np.savez_compressed(buf, **to_flat(mask))
    atomic.atomic_write_bytes(path, buf.getvalue())


def load(path: str, like: PyTree) -> PyTree:
    """Read a mask saved by :func:`save`, checking it against the params-shaped ``like``."""
    arrays = npz.read(path, "mask file")

    def get(p, leaf):
        key = path_str(p)
        if key not in arrays:
            raise ValueError(f"mask file {path} has no entry for parameter {key!r}")
        arr = arrays[key]
        if arr.shape != jnp.shape(leaf) or arr.dtype != np.bool_:
            raise ValueError(f"mask file {path}: entry {key!r} has shape {arr.shape} "
                             f"dtype {arr.dtype}, expected {jnp.shape(leaf)} bool")
        return jnp.asarray(arr)
    return jax.tree_util.tree_map_with_path(get, like)
