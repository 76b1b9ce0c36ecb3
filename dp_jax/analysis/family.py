"""Evaluate a network on a linear family of weights, one program vmapped over grid points.

Every analysis here that walks through weight space is a special case of

    theta(c) = sum_k c_k * A_k

for a few *anchor* pytrees ``A_k`` (trained solutions or directions) and a grid
of coefficient vectors ``c``:

  * linear interpolation: anchors (theta1, theta2), c = (1 - alpha, alpha);
  * the plane through three solutions: anchors (theta1, theta2, theta3), c barycentric;
  * random directions around theta: anchors (theta, d1, d2), c = (1, x, y).

The sum is written out term by term (not as a ``dot``) so that c = (0, 1) gives
``A_1`` bit for bit (endpoints reproduce the plain evaluations) and no backend
lowers it to reduced-precision matrix units.

An optional per-leaf *selector* ``s`` in [0, 1] mixes ``c`` with "stay at anchor
0": ``c_leaf = s * c + (1 - s) * e_0``. Layer-wise interpolation is then a
selector that is one on one layer's leaves, and runs the same compiled program.

BatchNorm statistics along the family (``bn_mode``):
  * ``"interpolate"``: the same combination of the anchors' ``batch_stats``
    (what the paper's authors did; direction anchors carry zero statistics);
  * ``"recompute"``: at every grid point, the average of per-batch statistics
    over a fixed set of training batches (train-mode forward passes) -- the
    analogue of PyTorch's ``reset_running_stats()`` with ``momentum=None``.

Test batches and training batches are dispatched from Python (one compiled
program each, fixed shapes); rolled ``lax.scan`` loops over conv nets are slow
on XLA:CPU.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dp_jax import masks as masks_lib
from dp_jax.models.layers import BN_MOMENTUM

PyTree = Any
BN_MODES = ("interpolate", "recompute")


def stack(trees) -> PyTree:
    """Stack pytrees of identical structure along a new leading axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


@functools.partial(jax.jit, static_argnums=1)
def unstack(tree: PyTree, i: int) -> PyTree:
    """Element ``i`` of a stacked pytree (jitted: eager indexing would copy the index)."""
    return jax.tree.map(lambda x: x[i], tree)


def _selector(tree: PyTree, value) -> PyTree:
    # Built on the host and copied once, explicitly (eager scalars would copy one per leaf).
    return jax.device_put(jax.tree_util.tree_map_with_path(
        lambda p, _: np.asarray(value(masks_lib.path_str(p)), np.float32), tree))


def ones_selector(tree: PyTree) -> PyTree:
    """Selector that applies the coefficients to every leaf (plain, whole-network families)."""
    return _selector(tree, lambda path: 1.0)


def combine(anchors: PyTree, coeffs: jax.Array, sel: Optional[PyTree] = None) -> PyTree:
    """``sum_k c_k A_k`` per leaf, with an optional per-leaf selector (see module doc).

    Args:
      anchors: pytree whose leaves are stacked ``(K, ...)``.
      coeffs: ``(K,)`` coefficients.
      sel: ``None`` or a pytree of scalars in [0, 1] with the structure of one anchor.

    Returns:
      One pytree shaped like a single anchor.
    """
    k = coeffs.shape[0]
    e0 = jnp.zeros((k,), coeffs.dtype).at[0].set(1)

    def one(a, s):
        c = coeffs if s is None else s * coeffs + (1 - s) * e0
        c = c.astype(a.dtype)
        out = c[0] * a[0]
        for j in range(1, k):  # K is 2 or 3: a short unrolled sum, exact at unit vectors
            out = out + c[j] * a[j]
        return out

    if sel is None:
        return jax.tree.map(lambda a: one(a, None), anchors)
    return jax.tree.map(one, anchors, sel)


def _variables(params, batch_stats):
    return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def eval_point(coeffs, anchors, sel, batch_stats, mask, x, y, w, *, model) -> dict:
    """Summed loss and correct count of ``theta(coeffs)`` on one (weighted) batch.

    Args:
      coeffs: ``(K,)`` coefficients of this grid point.
      anchors: stacked params ``(K, ...)``.
      sel: per-leaf selector (see :func:`combine`).
      batch_stats: BatchNorm statistics for this point (``{}`` without BatchNorm).
      mask: the pruning mask (applied in the forward pass, as in training).
      x, y, w: a batch, its labels and per-example weights (0 for padding).

    Returns:
      ``{"loss": sum_i w_i loss_i, "correct": sum_i w_i [argmax == y]}``.
    """
    params = masks_lib.apply(combine(anchors, coeffs, sel), mask)
    logits = model.apply(_variables(params, batch_stats), x, train=False)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return {"loss": jnp.sum(w * losses),
            "correct": jnp.sum(w * (jnp.argmax(logits, -1) == y))}


def scaled_batch_stats(coeffs, anchors, sel, mask, zero_stats, x, *, model) -> PyTree:
    """BatchNorm running statistics after one train-mode pass from zero statistics.

    A Flax BatchNorm update is ``m * running + (1 - m) * batch``; starting from
    zeros it returns ``(1 - m) * batch`` -- this batch's mean and (biased)
    variance, scaled. In train mode the normalisation itself uses batch
    statistics, so the result does not depend on the stored statistics.
    """
    params = masks_lib.apply(combine(anchors, coeffs, sel), mask)
    _, new = model.apply({"params": params, "batch_stats": zero_stats}, x, train=True,
                         mutable=["batch_stats"])
    return new["batch_stats"]


def pad_batches(x, y, batch_size: int):
    """Split ``(x, y)`` into equal batches; the last is zero-padded with weight 0.

    Returns:
      A list of ``(x_b, y_b, w_b)`` device arrays, all of shape ``batch_size``.
    """
    n = int(x.shape[0])
    b = min(int(batch_size), n)
    out = []
    for s in range(0, n, b):
        xb, yb = jnp.asarray(x[s:s + b]), jnp.asarray(y[s:s + b])
        w = jnp.ones((xb.shape[0],), jnp.float32)
        if xb.shape[0] < b:
            pad = b - xb.shape[0]
            xb = jnp.concatenate([xb, jnp.zeros((pad,) + xb.shape[1:], xb.dtype)])
            yb = jnp.concatenate([yb, jnp.zeros((pad,), yb.dtype)])
            w = jnp.concatenate([w, jnp.zeros((pad,), jnp.float32)])
        out.append((xb, yb, w))
    return out


class FamilyEvaluator:
    """Compiled evaluation of linear weight families; build once per model, reuse for every call.

    Args:
      model: Flax module called as ``apply(variables, x, train)``.
      eval_batch_size: test examples per dispatched program.
      chunk: grid points per program (``None``: all points of a call at once).
        Memory grows with ``chunk`` x (params + activations of one batch).
      bn_momentum: the models' BatchNorm momentum (checked on first use of ``recompute``).
    """

    def __init__(self, model, *, eval_batch_size: int = 1000, chunk: Optional[int] = None,
                 bn_momentum: float = BN_MOMENTUM):
        self.model = model
        self.eval_batch_size = int(eval_batch_size)
        self.chunk = None if chunk is None else max(int(chunk), 1)
        self.bn_momentum = float(bn_momentum)
        self._momentum_checked = False
        # Points are the mapped axis; anchors, selectors, mask and data are shared.
        self._eval = jax.jit(jax.vmap(functools.partial(eval_point, model=model),
                                      in_axes=(0, None, None, 0, None, None, None, None)))
        self._interp_stats = jax.jit(jax.vmap(combine, in_axes=(None, 0, None)))
        self._scaled_stats = jax.jit(jax.vmap(functools.partial(scaled_batch_stats, model=model),
                                              in_axes=(0, None, None, None, None, None)))

    def _check_momentum(self, coeffs, anchors, sel, mask, zero_stats, x):
        # The update must be m * old + (1 - m) * batch with the assumed m; compare
        # old = 1 against old = 0 on one batch before trusting the rescaling.
        ones = jax.tree.map(jnp.ones_like, zero_stats)
        a = self._scaled_stats(coeffs, anchors, sel, mask, ones, x)
        b = self._scaled_stats(coeffs, anchors, sel, mask, zero_stats, x)
        diff = jax.tree.map(lambda u, v: float(jnp.max(jnp.abs(u - v - self.bn_momentum))), a, b)
        worst = max(jax.tree.leaves(diff), default=0.0)
        if worst > 1e-2:
            raise ValueError(f"BatchNorm momentum of the model is not {self.bn_momentum} "
                             f"(off by {worst:.3g}); pass bn_momentum= to FamilyEvaluator")
        self._momentum_checked = True

    def batch_stats(self, anchors: dict, coeffs: jax.Array, mask: PyTree, *, sel: dict,
                    bn_mode: str, bn_batches=None) -> PyTree:
        """Statistics ``(G, ...)`` for the grid points ``coeffs`` (``{}`` without BatchNorm)."""
        if not anchors.get("batch_stats"):
            return {}
        if bn_mode == "interpolate":
            return self._interp_stats(anchors["batch_stats"], coeffs, sel["batch_stats"])
        if bn_mode != "recompute":
            raise ValueError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
        if bn_batches is None or len(bn_batches) == 0:
            raise ValueError("bn_mode='recompute' needs training batches (bn_batches)")
        zero = _zero_stats(anchors["batch_stats"])
        if not self._momentum_checked:
            self._check_momentum(coeffs, anchors["params"], sel["params"], mask, zero,
                                 bn_batches[0])
        total = None
        for xb in bn_batches:
            s = self._scaled_stats(coeffs, anchors["params"], sel["params"], mask, zero, xb)
            total = s if total is None else jax.tree.map(jnp.add, total, s)
        return _scaled(total, 1.0 / ((1.0 - self.bn_momentum) * len(bn_batches)))

    def evaluate(self, anchors: dict, coeffs, mask: PyTree, x, y, *, sel: Optional[dict] = None,
                 bn_mode: str = "interpolate", bn_batches=None, batches=None) -> dict:
        """Test loss and error at every grid point.

        Args:
          anchors: ``{"params": stacked (K, ...), "batch_stats": stacked or {}}``.
          coeffs: ``(G, K)`` coefficients, one row per grid point.
          mask: pruning mask (params-shaped, boolean).
          x, y: evaluation data (every example counts; the last batch is padded).
          sel: ``{"params": selector, "batch_stats": selector}``; default all ones.
          bn_mode: ``"interpolate"`` or ``"recompute"`` (see module doc).
          bn_batches: training batches ``(n, B, ...)`` or a list of them, for ``recompute``.
          batches: precomputed :func:`pad_batches` of ``(x, y)`` (saves re-padding).

        Returns:
          ``{"loss": (G,), "error": (G,)}`` as float64 NumPy arrays.
        """
        coeffs = np.asarray(jax.device_get(coeffs), np.float32)  # validated and padded here
        if coeffs.ndim != 2 or coeffs.shape[1] != jax.tree.leaves(anchors["params"])[0].shape[0]:
            raise ValueError(f"coeffs must be (G, K) with K anchors, got {coeffs.shape}")
        if sel is None:
            sel = {"params": ones_selector(unstack(anchors["params"], 0)),
                   "batch_stats": ones_selector(unstack(anchors.get("batch_stats", {}), 0))}
        if batches is None:
            batches = pad_batches(x, y, self.eval_batch_size)
        n = int(x.shape[0])
        g = coeffs.shape[0]
        c = self.chunk or g
        padded = np.concatenate([coeffs, np.repeat(coeffs[-1:], (-g) % c, 0)])
        loss, correct = [], []
        for s in range(0, padded.shape[0], c):
            cc = jax.device_put(padded[s:s + c])
            stats = self.batch_stats(anchors, cc, mask, sel=sel, bn_mode=bn_mode,
                                     bn_batches=bn_batches)
            tot = None
            for xb, yb, wb in batches:
                out = self._eval(cc, anchors["params"], sel["params"], stats, mask, xb, yb, wb)
                tot = out if tot is None else jax.tree.map(jnp.add, tot, out)
            tot = jax.device_get(tot)
            loss.append(np.asarray(tot["loss"], np.float64))
            correct.append(np.asarray(tot["correct"], np.float64))
        loss = np.concatenate(loss)[:g] / n
        err = 1.0 - np.concatenate(correct)[:g] / n
        return {"loss": loss, "error": err}


@jax.jit
def _zero_stats(stacked: PyTree) -> PyTree:
    """Zeros shaped like one anchor's statistics (jitted: no eager fill values)."""
    return jax.tree.map(lambda s: jnp.zeros_like(s[0]), stacked)


@functools.partial(jax.jit, static_argnums=1)
def _scaled(tree: PyTree, scale: float) -> PyTree:
    return jax.tree.map(lambda t: t * scale, tree)


def bn_batches(x_train, key: jax.Array, *, num_batches: int, batch_size: int) -> jax.Array:
    """A fixed, seeded set of training batches ``(num_batches, batch_size, ...)``.

    Examples are drawn without replacement while the training set lasts (a
    permutation, tiled if more examples are asked for than exist).
    """
    n = int(x_train.shape[0])
    need = int(num_batches) * int(batch_size)
    perm = np.asarray(jax.random.permutation(key, n))
    idx = np.resize(perm, need)
    return jnp.asarray(x_train)[jnp.asarray(idx)].reshape((num_batches, batch_size)
                                                          + tuple(x_train.shape[1:]))


def module_of(path: str) -> str:
    """The module of a leaf: its path without the last component (``fc1/kernel`` -> ``fc1``)."""
    return path.rsplit("/", 1)[0] if "/" in path else path


def layer_names(params: PyTree) -> list[str]:
    """Parameter-owning modules in tree order (each is one "layer" for layer-wise analyses)."""
    names = []
    for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        m = module_of(masks_lib.path_str(p))
        if m not in names:
            names.append(m)
    return names


def layer_selector(tree: PyTree, layer: str) -> PyTree:
    """Selector that is one on the leaves of ``layer`` and zero elsewhere."""
    return _selector(tree, lambda path: 1.0 if module_of(path) == layer else 0.0)
