"""Loss landscapes of masked networks: lines, planes through solutions, random directions.

* **1-D interpolation** between two solutions on an extended alpha range.
* **The plane through three solutions** (seeds or copies): an orthonormal basis
  ``(u, v)`` from ``theta2 - theta1`` and ``theta3 - theta1`` by Gram-Schmidt,
  a grid in those coordinates, each grid point written as the affine
  combination of the three solutions (so BatchNorm statistics can follow the
  same weights, and the solutions themselves are evaluated exactly).
* **Filter-normalised random directions** (Li et al. 2018): a Gaussian
  direction, masked (pruned weights stay zero along every direction), then each
  output filter -- the *last* kernel axis in Flax, for conv HWIO and dense
  (in, out) kernels alike -- rescaled to the norm of the same (masked) filter of
  the weights; biases and normalisation parameters get zero directions, and
  BatchNorm statistics stay those of the centre (``interpolate``) or are
  recomputed. The directions and their seed are saved (npz).

All grids are evaluated with :class:`dp_jax.analysis.family.FamilyEvaluator`,
vmapped over grid points.
"""

from __future__ import annotations

import io as _io
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dp_jax.storage import fileio
from dp_jax import masks as masks_lib
from dp_jax.analysis import family
from dp_jax.models import is_prunable

PyTree = Any


def _tree_dot(a: PyTree, b: PyTree) -> float:
    return float(sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


def filter_normalize(direction: PyTree, params: PyTree, mask: PyTree) -> PyTree:
    """Mask ``direction`` and scale each output filter to the weight filter's norm.

    Kernels (conv HWIO, dense (in, out)) are normalised per slice of the last
    axis; every other leaf (biases, norm scales/offsets) gets a zero direction.
    A filter whose direction is all zero (e.g. fully pruned) stays zero.

    Args:
      direction, params, mask: pytrees of the same structure.

    Returns:
      The normalised direction.
    """
    def norm_leaf(path, d, w, m):
        if not is_prunable(path, w):
            return jnp.zeros_like(d)
        d = jnp.where(m, d, 0.0)
        w = jnp.where(m, w, 0.0)
        axes = tuple(range(d.ndim - 1))
        dn = jnp.sqrt(jnp.sum(d * d, axis=axes, keepdims=True))
        wn = jnp.sqrt(jnp.sum(w * w, axis=axes, keepdims=True))
        return d * jnp.where(dn > 0, wn / jnp.where(dn > 0, dn, 1.0), 0.0)
    return jax.tree_util.tree_map_with_path(norm_leaf, direction, params, mask)


def random_directions(key: jax.Array, params: PyTree, mask: PyTree, num: int) -> list[PyTree]:
    """``num`` filter-normalised Gaussian directions; direction ``i`` uses ``fold_in(key, i)``."""
    out = []
    leaves, treedef = jax.tree.flatten(params)
    for i in range(num):
        keys = jax.random.split(jax.random.fold_in(key, i), len(leaves))
        d = jax.tree.unflatten(treedef, [jax.random.normal(k, jnp.shape(x), jnp.asarray(x).dtype)
                                         for k, x in zip(keys, leaves)])
        out.append(filter_normalize(d, params, mask))
    return out


def _zero_stats(stats: PyTree) -> PyTree:
    return jax.tree.map(jnp.zeros_like, stats)


def line(evaluator: family.FamilyEvaluator, a: dict, b: dict, mask: PyTree, x, y, *,
         alphas: Sequence[float], **bn) -> dict:
    """Loss and error along ``(1 - alpha) a + alpha b`` (alpha may leave [0, 1]).

    Returns:
      ``{"alphas", "loss", "error"}``.
    """
    a_ = np.asarray(alphas, np.float32)
    out = evaluator.evaluate(family.stack([a, b]), np.stack([1 - a_, a_], 1), mask, x, y, **bn)
    return {"alphas": a_.tolist(), "loss": out["loss"].tolist(), "error": out["error"].tolist()}


def plane_coordinates(solutions: Sequence[PyTree]) -> np.ndarray:
    """Coordinates ``(3, 2)`` of three solutions in their plane's orthonormal basis.

    ``u = (theta2 - theta1) / |theta2 - theta1|`` and ``v`` is the Gram-Schmidt
    remainder of ``theta3 - theta1``; theta1 sits at the origin, theta2 on the u axis.
    """
    p1, p2, p3 = solutions
    d2 = jax.tree.map(jnp.subtract, p2, p1)
    d3 = jax.tree.map(jnp.subtract, p3, p1)
    n2 = np.sqrt(_tree_dot(d2, d2))
    if n2 <= 0:
        raise ValueError("the first two solutions coincide; no plane through them")
    c = _tree_dot(d3, d2) / n2            # theta3's coordinate along u
    h2 = _tree_dot(d3, d3) - c * c        # squared distance of theta3 from the u axis
    if h2 <= 1e-10 * max(n2 * n2, 1e-30):
        raise ValueError("the three solutions are collinear; no unique plane")
    return np.array([[0.0, 0.0], [n2, 0.0], [c, np.sqrt(h2)]])


def plane_coefficients(points: np.ndarray, x, y) -> np.ndarray:
    """Affine weights ``(G, 3)`` on the three solutions of the plane points ``(x, y)``.

    ``theta1 + x u + y v = theta1 + a (theta2 - theta1) + b (theta3 - theta1)``
    with ``b = y / h`` and ``a = (x - b c) / |theta2 - theta1|``.
    """
    n2, (c, h) = points[1, 0], points[2]
    b = np.asarray(y, np.float64) / h
    a = (np.asarray(x, np.float64) - b * c) / n2
    return np.stack([1 - a - b, a, b], -1)


def plane(evaluator: family.FamilyEvaluator, solutions: Sequence[dict], mask: PyTree, x, y, *,
          grid: int = 11, margin: float = 0.3, **bn) -> dict:
    """Loss and error on the plane through three solutions.

    Args:
      evaluator: the family evaluator.
      solutions: three ``{"params", "batch_stats"}``.
      mask: shared pruning mask.
      x, y: evaluation data.
      grid: points per axis.
      margin: extra extent around the three points, as a fraction of their spread.
      **bn: ``bn_mode``/``bn_batches``/``batches`` for :meth:`FamilyEvaluator.evaluate`.

    Returns:
      ``{"x", "y", "loss" (grid x grid, [iy][ix]), "error", "points" (the three
      solutions' coordinates)}``.
    """
    if len(solutions) != 3:
        raise ValueError(f"a plane needs exactly 3 solutions, got {len(solutions)}")
    pts = plane_coordinates([s["params"] for s in solutions])
    lo, hi = pts.min(0), pts.max(0)
    pad = margin * (hi - lo).max()
    xs = np.linspace(lo[0] - pad, hi[0] + pad, grid)
    ys = np.linspace(lo[1] - pad, hi[1] + pad, grid)
    X, Y = np.meshgrid(xs, ys)            # [iy, ix]
    coeffs = plane_coefficients(pts, X.ravel(), Y.ravel())
    out = evaluator.evaluate(family.stack(list(solutions)), coeffs, mask, x, y, **bn)
    return {"x": xs.tolist(), "y": ys.tolist(),
            "loss": out["loss"].reshape(grid, grid).tolist(),
            "error": out["error"].reshape(grid, grid).tolist(), "points": pts.tolist()}


def around(evaluator: family.FamilyEvaluator, center: dict, directions: Sequence[PyTree],
           mask: PyTree, x, y, *, points: int = 11, span: float = 1.0, **bn) -> dict:
    """Loss and error on ``theta + sum_i t_i d_i`` over a 1-D or 2-D grid ``t in [-span, span]``.

    Returns:
      ``{"t", "loss", "error"}``; 2-D results are ``[i2][i1]`` nested lists.
    """
    if len(directions) not in (1, 2):
        raise ValueError(f"1 or 2 directions, got {len(directions)}")
    stats = center.get("batch_stats", {})
    anchors = family.stack([center] + [{"params": d, "batch_stats": _zero_stats(stats)}
                                       for d in directions])
    t = np.linspace(-span, span, points)
    if len(directions) == 1:
        coeffs = np.stack([np.ones_like(t), t], 1)
    else:
        T1, T2 = np.meshgrid(t, t)
        coeffs = np.stack([np.ones(T1.size), T1.ravel(), T2.ravel()], 1)
    out = evaluator.evaluate(anchors, coeffs, mask, x, y, **bn)
    shape = (points,) if len(directions) == 1 else (points, points)
    return {"t": t.tolist(), "loss": out["loss"].reshape(shape).tolist(),
            "error": out["error"].reshape(shape).tolist()}


def directions_arrays(directions: Sequence[PyTree], *, seed: int, purpose: int) -> dict:
    """``{"seed", "purpose", "d{i}/<param path>": array}`` for an npz file."""
    arrays = {"seed": np.asarray(seed), "purpose": np.asarray(purpose)}
    for i, d in enumerate(directions):
        for p, v in jax.tree_util.tree_flatten_with_path(d)[0]:
            arrays[f"d{i}/{masks_lib.path_str(p)}"] = np.asarray(v)
    return arrays


def save_directions(path: str, directions: Sequence[PyTree], *, seed: int, purpose: int) -> None:
    """Write directions (``d{i}/<param path>``) and the seed that generated them, atomically.

    In the workdir driver the directions are ``random_directions(analysis_key(seed,
    purpose), ...)`` of the saved solution, so the seed reproduces them.
    """
    buf = _io.BytesIO()
    np.savez_compressed(buf, **directions_arrays(directions, seed=seed, purpose=purpose))
    fileio.atomic_write_bytes(path, buf.getvalue())


def load_directions(path: str, like: PyTree) -> list[PyTree]:
    """Directions saved by :func:`save_directions`, shaped like ``like``."""
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    out, i = [], 0
    while any(k.startswith(f"d{i}/") for k in arrays):
        out.append(jax.tree_util.tree_map_with_path(
            lambda p, _: jnp.asarray(arrays[f"d{i}/{masks_lib.path_str(p)}"]), like))
        i += 1
    return out


def analyze(evaluator: family.FamilyEvaluator, copies: Sequence[dict], mask: PyTree, x, y,
            key: jax.Array, *, grid: int = 11, line_points: int = 21, span: float = 1.0,
            line_range: tuple[float, float] = (-0.5, 1.5), **bn) -> tuple[dict, list[PyTree]]:
    """All landscapes of one mask around its trained copies.

    1-D interpolation copy 0 -> copy 1; the plane through copies 0-2 (when there
    are three); 1-D and 2-D filter-normalised random directions around copy 0.

    Returns:
      ``(summary, directions)``: a JSON-able dict and the two directions used.
    """
    c0 = copies[0]
    dirs = random_directions(key, c0["params"], mask, 2)
    out = {"interpolation": line(evaluator, copies[0], copies[1], mask, x, y,
                                 alphas=np.linspace(*line_range, line_points), **bn),
           "random_1d": around(evaluator, c0, dirs[:1], mask, x, y, points=line_points,
                               span=span, **bn),
           "random_2d": around(evaluator, c0, dirs, mask, x, y, points=grid, span=span, **bn)}
    if len(copies) >= 3:
        out["plane"] = plane(evaluator, copies[:3], mask, x, y, grid=grid, **bn)
    r2 = np.asarray(out["random_2d"]["loss"])
    centre = r2[grid // 2, grid // 2] if grid % 2 else float(np.min(r2))
    out["sharpness"] = {
        "center_loss": float(centre),
        "mean_loss_increase_2d": float(r2.mean() - centre),
        "loss_increase_1d_at_span": float(np.mean([out["random_1d"]["loss"][0],
                                                   out["random_1d"]["loss"][-1]]) - centre)}
    out["num_examples"] = int(x.shape[0])
    return out, dirs
