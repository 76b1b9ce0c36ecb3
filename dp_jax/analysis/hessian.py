"""Curvature of the training loss on the unpruned subspace: HVPs, Lanczos, Hutchinson, SLQ.

Everything works on flat vectors (``jax.flatten_util.ravel_pytree`` of the
params). With ``m`` the flat mask (1 for unpruned weights, biases and norm
parameters; 0 for pruned weights), the operator is ``v -> m * H (m * v)``: the
Hessian restricted to the unpruned coordinates, zero on pruned ones. Its
spectrum is the restricted Hessian's plus ``#pruned`` zeros; probes are drawn
inside the subspace so Lanczos and SLQ never see those zeros.

**Loss**: the mean cross-entropy over a fixed, seeded subset of the training set,
computed in batches (each batch's summed loss is divided by the subset size, so
the batches add up to the mean), in **eval mode at fixed batch_stats**.
BatchNorm then uses its stored running statistics, making the loss a function of
the parameters alone: the Hessian is well defined and symmetric, and does not
couple the examples of a batch through batch statistics (train mode would
differentiate through them and depend on the batch split). For models without
BatchNorm both modes coincide.

**HVP**: forward-over-reverse (``jax.jvp`` of ``jax.grad``), or reverse-over-reverse
(``jax.grad`` of ``<grad, v>``) when convolutions go through :mod:`dp_jax.models.convs`,
whose custom VJPs have no forward mode; both give ``H v``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from dp_jax import masks as masks_lib
from dp_jax.analysis import family
from dp_jax.models.convs import fast_convs

PyTree = Any
HIGHEST = jax.lax.Precision.HIGHEST


def _loss_sum(theta, mflat, batch_stats, x, y, w, *, model, unravel, fast_conv=True):
    params = unravel(theta * mflat)
    v = {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}
    # HVPs differentiate convolutions twice; fast_convs lowers those terms to canonical
    # convolutions (XLA:CPU runs the default lowering through a slow generic loop).
    with fast_convs(fast_conv):
        logits = model.apply(v, x, train=False)
    return jnp.sum(w * optax.softmax_cross_entropy_with_integer_labels(logits, y))


def _hvp_sum(theta, mflat, v, batch_stats, x, y, w, *, model, unravel, fast_conv=True):
    grad = jax.grad(functools.partial(_loss_sum, model=model, unravel=unravel,
                                      fast_conv=fast_conv))
    g = lambda t: grad(t, mflat, batch_stats, x, y, w)  # noqa: E731
    if fast_conv:
        # fast_convs has custom VJPs (no forward mode): reverse-over-reverse, d/dt <g(t), v>.
        return jax.grad(lambda t: jnp.vdot(g(t), v * mflat))(theta) * mflat
    return jax.jvp(g, (theta,), (v * mflat,))[1] * mflat


class HessianEngine:
    """Compiled loss and HVP programs for one model and parameter structure; build once.

    Args:
      model: Flax module.
      like_params: a params pytree (fixes the flat layout).
      fast_conv: route stride-1 convolutions through :mod:`dp_jax.models.convs` (same values;
        several times faster second derivatives on CPU).
    """

    def __init__(self, model, like_params: PyTree, fast_conv: bool = True):
        flat, self.unravel = ravel_pytree(like_params)
        self.size = int(flat.size)
        kw = dict(model=model, unravel=self.unravel, fast_conv=bool(fast_conv))
        self._loss = jax.jit(functools.partial(_loss_sum, **kw))
        self._hvp = jax.jit(functools.partial(_hvp_sum, **kw))
        # Several probes per program: the batch of vectors is the mapped axis.
        self._hvp_many = jax.jit(jax.vmap(functools.partial(_hvp_sum, **kw),
                                          in_axes=(None, None, 0, None, None, None, None)))

    def flatten(self, tree: PyTree) -> jax.Array:
        """Flat float32 vector of a params-shaped tree (masks become 0/1)."""
        return ravel_pytree(jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree))[0]

    def bind(self, params: PyTree, batch_stats: PyTree, mask: PyTree, x, y, *,
             batch_size: int = 500) -> "HessianOperator":
        """The restricted Hessian at ``params`` on the data ``(x, y)``."""
        return HessianOperator(self, params, batch_stats, mask, x, y, batch_size=batch_size)


class HessianOperator:
    """``v -> m * H (m * v)`` at fixed params on a fixed data subset (see module doc)."""

    def __init__(self, engine: HessianEngine, params, batch_stats, mask, x, y, *,
                 batch_size: int = 500):
        self.engine = engine
        self.mflat = engine.flatten(mask)
        self.theta = engine.flatten(params) * self.mflat
        self.batch_stats = batch_stats or {}
        self.batches = family.pad_batches(x, y, batch_size)
        self.n = int(x.shape[0])
        self.dim = int(jnp.sum(self.mflat))

    def loss(self) -> float:
        """The mean training loss on the subset."""
        tot = sum(self.engine._loss(self.theta, self.mflat, self.batch_stats, xb, yb, wb)
                  for xb, yb, wb in self.batches)
        return float(tot) / self.n

    def matvec(self, v: jax.Array) -> jax.Array:
        """``m * H (m * v)`` for one flat vector."""
        out = None
        for xb, yb, wb in self.batches:
            hv = self.engine._hvp(self.theta, self.mflat, v, self.batch_stats, xb, yb, wb)
            out = hv if out is None else out + hv
        return out / self.n

    def matvec_many(self, vs: jax.Array) -> jax.Array:
        """``matvec`` of each row of ``vs`` (``(p, n)``), as one vmapped program per batch."""
        out = None
        for xb, yb, wb in self.batches:
            hv = self.engine._hvp_many(self.theta, self.mflat, vs, self.batch_stats, xb, yb, wb)
            out = hv if out is None else out + hv
        return out / self.n

    def unravel(self, flat) -> PyTree:
        """Params-shaped pytree of a flat vector."""
        return self.engine.unravel(jnp.asarray(flat, jnp.float32))


_set_row = jax.jit(lambda V, v, j: V.at[j].set(v), donate_argnums=0)


@jax.jit
def _orthogonalize(V, w, j):
    """Full re-orthogonalisation of ``w`` against rows ``0..j`` of ``V``, twice (CGS2)."""
    keep = (jnp.arange(V.shape[0]) <= j)[:, None]
    Vj = jnp.where(keep, V, 0.0)
    for _ in range(2):  # the second pass repairs the float32 loss of orthogonality
        w = w - jnp.matmul(jnp.matmul(Vj, w, precision=HIGHEST), Vj, precision=HIGHEST)
    return w, jnp.linalg.norm(w)


def lanczos(matvec: Callable[[jax.Array], jax.Array], v0: jax.Array, num_steps: int, *,
            tol: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Lanczos tridiagonalisation with full re-orthogonalisation.

    Stops early when the Krylov space is exhausted (``beta < tol * max|alpha|``).

    Args:
      matvec: the symmetric operator.
      v0: start vector (normalised here).
      num_steps: maximum Krylov dimension.

    Returns:
      ``(alpha, beta)``: the diagonal (length ``m <= num_steps``) and the
      off-diagonal (length ``m - 1``) of the tridiagonal matrix, float64.
    """
    v = v0 / jnp.linalg.norm(v0)
    V = jnp.zeros((num_steps, v.shape[0]), v.dtype)
    alphas, betas = [], []
    scale = 0.0
    for j in range(num_steps):
        V = _set_row(V, v, j)  # in place: V can be large (steps x params)
        w = matvec(v)
        a = float(jnp.vdot(w, v))
        alphas.append(a)
        scale = max(scale, abs(a))
        if j == num_steps - 1:
            break
        w, b = _orthogonalize(V, w, j)
        b = float(b)
        if b <= tol * max(scale, 1e-30):
            break
        betas.append(b)
        v = w / b
    return np.asarray(alphas, np.float64), np.asarray(betas, np.float64)


def tridiag_eigh(alpha: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (ascending) and eigenvectors of the Lanczos tridiagonal matrix."""
    T = np.diag(alpha) + np.diag(beta, 1) + np.diag(beta, -1)
    return np.linalg.eigh(T)


def _rademacher(key, op: HessianOperator) -> jax.Array:
    return jax.random.rademacher(key, (op.engine.size,), jnp.float32) * op.mflat


def top_eigenvalues(op: HessianOperator, key: jax.Array, *, k: int = 5, num_steps: int = 20,
                    tridiag: Optional[tuple] = None) -> dict:
    """Largest eigenvalues of the restricted Hessian by Lanczos (Ritz values).

    Args:
      op: the restricted Hessian.
      key: seeds the (masked Rademacher) start vector.
      k: how many eigenvalues to report.
      num_steps: Krylov dimension (capped at the number of unpruned coordinates).
      tridiag: optional ``(alpha, beta)`` of a Lanczos run already done (reused).

    Returns:
      ``{"top_eigenvalues": k largest (descending), "min_eigenvalue": smallest
      Ritz value, "lanczos_steps": steps taken}``.
    """
    if tridiag is None:
        tridiag = lanczos(op.matvec, _rademacher(key, op), min(num_steps, op.dim))
    alpha, beta = tridiag
    ritz = np.linalg.eigvalsh(np.diag(alpha) + np.diag(beta, 1) + np.diag(beta, -1))
    return {"top_eigenvalues": ritz[::-1][:k].tolist(), "min_eigenvalue": float(ritz[0]),
            "lanczos_steps": int(alpha.size)}


def hutchinson(op: HessianOperator, key: jax.Array, *, num_probes: int = 32,
               probe_batch: int = 4) -> dict:
    """Trace (``E v^T H v``) and diagonal (``E v * Hv``) with masked Rademacher probes.

    Returns:
      ``{"trace", "trace_stderr", "num_probes", "diag"}``; ``diag`` is a flat
      float64 NumPy vector (zero on pruned coordinates).
    """
    probe_batch = max(1, min(int(probe_batch), int(num_probes)))
    rounds = -(-int(num_probes) // probe_batch)
    quad, diag = [], np.zeros(op.engine.size, np.float64)
    for r in range(rounds):
        v = jax.random.rademacher(jax.random.fold_in(key, r), (probe_batch, op.engine.size),
                                  jnp.float32) * op.mflat
        hv = op.matvec_many(v)
        vhv = np.asarray(jax.device_get(v * hv), np.float64)
        quad.extend(vhv.sum(axis=1).tolist())
        diag += vhv.sum(axis=0)
    quad = np.asarray(quad)
    return {"trace": float(quad.mean()),
            "trace_stderr": float(quad.std(ddof=1) / np.sqrt(quad.size)) if quad.size > 1 else 0.0,
            "num_probes": int(quad.size), "diag": diag / quad.size}


def spectral_density(op: HessianOperator, key: jax.Array, *, num_probes: int = 2,
                     num_steps: int = 20, grid_size: int = 256, sigma_rel: float = 0.01,
                     tridiags: Sequence[tuple] = ()) -> dict:
    """Eigenvalue density by stochastic Lanczos quadrature, Gaussian-broadened.

    Each probe ``v`` (Rademacher on the unpruned coordinates, unit norm) gives
    nodes ``theta_j`` (Ritz values) and weights ``tau_j = U[0, j]^2`` with
    ``sum_j tau_j f(theta_j) ~ v^T f(H) v``; the density averages
    ``sum_j tau_j N(t; theta_j, sigma^2)`` over probes, with ``sigma =
    sigma_rel * (spectral range)``. It integrates to one over the real line.

    ``tridiags`` are Lanczos runs from such probes already done; they count
    towards ``num_probes`` (probe ``p`` uses ``fold_in(key, p)``).

    Returns:
      ``{"grid", "density", "nodes", "weights", "sigma"}`` (nodes/weights per probe).
    """
    nodes, weights = [], []
    runs = list(tridiags)
    for p in range(len(runs), num_probes):
        runs.append(lanczos(op.matvec, _rademacher(jax.random.fold_in(key, p), op),
                            min(num_steps, op.dim)))
    for alpha, beta in runs:
        theta, U = tridiag_eigh(alpha, beta)
        nodes.append(theta)
        weights.append(U[0] ** 2)
    lo = min(float(n.min()) for n in nodes)
    hi = max(float(n.max()) for n in nodes)
    span = max(hi - lo, 1e-12 * max(abs(hi), 1.0), 1e-12)
    sigma = sigma_rel * span
    grid = np.linspace(lo - 0.05 * span - 3 * sigma, hi + 0.05 * span + 3 * sigma, grid_size)
    dens = np.zeros_like(grid)
    for th, tau in zip(nodes, weights):
        z = (grid[:, None] - th[None, :]) / sigma
        dens += (np.exp(-0.5 * z ** 2) * tau[None, :]).sum(1) / (sigma * np.sqrt(2 * np.pi))
    dens /= len(nodes)
    return {"grid": grid.tolist(), "density": dens.tolist(),
            "nodes": [n.tolist() for n in nodes], "weights": [w.tolist() for w in weights],
            "sigma": float(sigma)}


def data_subset(x, y, key: jax.Array, num_examples: int):
    """A fixed, seeded subset of ``num_examples`` examples (all if fewer exist)."""
    n = int(x.shape[0])
    idx = np.sort(np.asarray(jax.random.permutation(key, n))[:min(int(num_examples), n)])
    return jnp.asarray(x)[idx], jnp.asarray(y)[idx]


def diag_by_layer(op: HessianOperator, diag: np.ndarray, mask: PyTree) -> dict:
    """Per leaf: mean and max of the diagonal estimate over its unpruned entries."""
    tree = op.unravel(diag)
    flat_d = {masks_lib.path_str(p): np.asarray(v) for p, v in
              jax.tree_util.tree_flatten_with_path(tree)[0]}
    flat_m = {masks_lib.path_str(p): np.asarray(v, bool) for p, v in
              jax.tree_util.tree_flatten_with_path(mask)[0]}
    out = {}
    for k, d in flat_d.items():
        sel = d[flat_m[k]]
        out[k] = {"mean": float(sel.mean()) if sel.size else 0.0,
                  "max": float(sel.max()) if sel.size else 0.0, "unpruned": int(sel.size)}
    return out


def analyze(engine: HessianEngine, params: PyTree, batch_stats: PyTree, mask: PyTree, x, y,
            key: jax.Array, *, top_k: int = 5, lanczos_steps: int = 20, trace_probes: int = 32,
            probe_batch: int = 4, slq_probes: int = 2, slq_steps: Optional[int] = None,
            batch_size: int = 500) -> tuple[dict, np.ndarray]:
    """Top eigenvalues, trace, diagonal and spectral density of the restricted Hessian.

    Args:
      engine: a :class:`HessianEngine` for the model.
      params, batch_stats, mask: the network (BatchNorm statistics are held fixed).
      x, y: the fixed training subset.
      key: seeds the probes (Lanczos start, Rademacher probes).
      top_k, lanczos_steps: eigenvalues reported and Krylov dimension.
      trace_probes, probe_batch: Hutchinson probes and how many share a program.
      slq_probes, slq_steps: SLQ probes and Lanczos steps each (default ``lanczos_steps``).
      batch_size: examples per HVP program.

    Returns:
      ``(summary, diag)``: a JSON-able dict and the flat diagonal estimate.
    """
    op = engine.bind(params, batch_stats, mask, x, y, batch_size=batch_size)
    slq_key = jax.random.fold_in(key, 0)
    # One Lanczos run serves both the top eigenvalues and the first SLQ probe
    # (a masked Rademacher start vector is a valid SLQ probe).
    first = lanczos(op.matvec, _rademacher(jax.random.fold_in(slq_key, 0), op),
                    min(lanczos_steps, op.dim))
    top = top_eigenvalues(op, slq_key, k=top_k, tridiag=first)
    hut = hutchinson(op, jax.random.fold_in(key, 1), num_probes=trace_probes,
                     probe_batch=probe_batch)
    same = (slq_steps or lanczos_steps) == lanczos_steps
    slq = spectral_density(op, slq_key, num_probes=slq_probes,
                           num_steps=slq_steps or lanczos_steps,
                           tridiags=[first] if same and slq_probes > 0 else ())
    diag = hut.pop("diag")
    summary = {**top, **hut, "loss": op.loss(), "num_examples": op.n,
               "unpruned_params": op.dim, "total_params": engine.size,
               "diag_by_layer": diag_by_layer(op, diag, mask), "density": slq,
               "mode": "eval (fixed batch_stats)"}
    return summary, diag
