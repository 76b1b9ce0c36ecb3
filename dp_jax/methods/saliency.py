"""Pruning-at-initialisation saliencies: SNIP, GraSP and SynFlow (higher score = keep).

Every score function returns a params-shaped tree that :func:`dp_jax.masks.prune` ranks (it
removes the *lowest* alive scores and reads only the prunable leaves). Scores are evaluated on
the masked network ``params * mask``, so pruned weights score 0 and carry no signal.

Programs are compiled once per model (modules are hashable) and reused across calls, masks and
weights; only a new batch shape compiles again.

  * SNIP (Lee et al. 2019): ``|dL/dw * w|``, gradients averaged over the given batches.
  * GraSP (Wang et al. 2020): ``theta * (H g)`` with an exact Hessian-vector product; the sign
    is flipped relative to the paper so that removing the lowest of ours removes the highest of
    theirs (see :func:`grasp_scores`).
  * SynFlow (Tanaka et al. 2020): data-free ``|dR/dtheta * theta|`` of the all-positive network,
    computed in float64 by default because R overflows float32 in deep nets; iterated with the
    exponential schedule by :func:`synflow_prune`.
  * FORCE (de Jorge et al. 2021): ``|theta * dL/dw|`` at ``w = theta * mask``, the gradient
    with respect to the sparsified weights, so pruned weights score too and may come back
    (:func:`force_scores`); iterated with an exponential schedule by :func:`force_prune`.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dp_jax import masks as masks_lib
from dp_jax.models import is_prunable
from dp_jax.models.convs import fast_convs
from dp_jax.training.trainer import cross_entropy

PyTree = Any


def _forward(model, params, batch_stats, x, *, train: bool):
    v = {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}
    if train and batch_stats:
        # Batch statistics in the forward pass; the updated running stats are discarded.
        return model.apply(v, x, train=True, mutable=["batch_stats"])[0]
    return model.apply(v, x, train=train)


def _loss(model, params, batch_stats, mask, x, y, temperature):
    # The mask sits inside the loss (as in train_step): pruned weights get zero gradient
    # and zero Hessian rows, i.e. we differentiate the pruned network.
    logits = _forward(model, masks_lib.apply(params, mask), batch_stats, x, train=True)
    return cross_entropy(logits / temperature, y)


def _build_grad(model):
    grad = jax.grad(functools.partial(_loss, model))

    def step(acc, p, bs, m, x, y, t):
        return jax.tree.map(jnp.add, acc, grad(p, bs, m, x, y, t))
    return jax.jit(step)


def _build_hvp(model):
    grad = jax.grad(functools.partial(_loss, model))

    def hvp(acc, p, bs, m, x, y, t, v):
        # Forward-over-reverse: the exact H v in one pass, no finite differences; v (= g) is a
        # constant direction, not a function of p.
        v = jax.lax.stop_gradient(v)
        _, hv = jax.jvp(lambda q: grad(q, bs, m, x, y, t), (p,), (v,))
        return jax.tree.map(jnp.add, acc, hv)
    return jax.jit(hvp)


def _build_synflow(model):
    def score(params, batch_stats, mask, *, image_shape, dtype):
        # As the reference's ``linearize``: |.| of every parameter (biases and norm affines
        # included) and of the running statistics, pruned weights zeroed.
        theta = jax.tree.map(lambda p, m: jnp.where(m, jnp.abs(p), 0).astype(dtype), params, mask)
        stats = jax.tree.map(lambda s: jnp.abs(s).astype(dtype), batch_stats)
        x = jnp.ones((1, *image_shape), dtype)
        g = jax.grad(lambda t: jnp.sum(_forward(model, t, stats, x, train=False)))(theta)
        return jax.tree.map(lambda gi, ti: jnp.abs(gi * ti), g, theta)
    return jax.jit(score, static_argnames=("image_shape", "dtype"))


@functools.lru_cache(maxsize=64)
def _cached(builder, model):
    return builder(model)


def _compiled(builder, model):
    try:
        hash(model)
    except TypeError:  # a hand-built module with unhashable fields: compile per call
        return builder(model)
    return _cached(builder, model)


def _fast():
    # Same values; conv gradients lower to kernels XLA:CPU runs fast (first-order only: the
    # custom-VJP convolutions cannot be forward-differentiated, so GraSP does not use this).
    return fast_convs(jax.default_backend() == "cpu")


def _mean_over(fn, params, bs, mask, batches, *rest):
    """Mean over ``batches`` of a per-batch tree, summed by the jitted ``fn(acc, ...)``."""
    batches = list(batches)
    if not batches:
        raise ValueError("saliency scores need at least one (x, y) batch")
    acc = jax.tree.map(jnp.zeros_like, params)
    for x, y in batches:
        acc = fn(acc, params, bs, mask, jnp.asarray(x), jnp.asarray(y), *rest)
    return jax.tree.map(lambda a: a / len(batches), acc)


def snip_scores(model, variables: dict, mask: PyTree,
                batches: Sequence[tuple[Any, Any]]) -> PyTree:
    """SNIP connection sensitivity ``|g * w|`` with ``w = params * mask``.

    ``g`` is the gradient of the mean cross-entropy w.r.t. the masked weights, averaged over the
    ``(x, y)`` minibatches in ``batches``. BatchNorm runs in train mode (batch statistics); the
    updated running stats are discarded. Pruned weights score exactly 0.
    """
    params, bs = variables["params"], variables.get("batch_stats") or {}
    with _fast():
        g = _mean_over(_compiled(_build_grad, model), params, bs, mask, batches,
                       jnp.float32(1.0))
    return jax.tree.map(lambda gi, w: jnp.abs(gi * w), g, masks_lib.apply(params, mask))


def grasp_scores(model, variables: dict, mask: PyTree, batches: Sequence[tuple[Any, Any]], *,
                 temperature: float = 200.0) -> PyTree:
    """GraSP scores ``theta * (H g)`` (keep the highest), ``theta = params * mask``.

    ``g`` is the loss gradient averaged over ``batches`` and ``H g`` the exact Hessian-vector
    product (``jax.jvp`` of ``jax.grad``) of the same mean loss at the same point, with ``g``
    held constant. As in the reference code (``alecwangcq/GraSP``, ``pruner/GraSP.py``), ``g``
    is restricted to the prunable kernels (``z = sum_w g_w . grad_w``), i.e. ``H_ww g_w``.

    Sign: the paper scores ``S(-theta) = -theta * Hg`` and removes the *highest* S (the
    reference keeps ``score <= threshold`` of its top-k). :func:`dp_jax.masks.prune` removes the
    *lowest*, so we return ``-S = theta * Hg``: the same weights go. Scores may be negative.

    Temperature: the logits are divided by ``temperature`` in both the ``g`` and the ``Hg``
    passes. The paper's equations have none, but its released code (whose runs the paper
    reports, and the SynFlow repo's GraSP port) uses T = 200 in both, hence the default; pass
    1.0 for the plain loss. BatchNorm in train mode, as the reference (it never calls ``eval``).
    The reference's global normalisation by ``|sum S|`` is a positive scale and is omitted.
    """
    params, bs = variables["params"], variables.get("batch_stats") or {}
    t = jnp.float32(temperature)
    g = _mean_over(_compiled(_build_grad, model), params, bs, mask, batches, t)
    v = jax.tree_util.tree_map_with_path(
        lambda path, gi: gi if is_prunable(path, gi) else jnp.zeros_like(gi), g)
    hg = _mean_over(_compiled(_build_hvp, model), params, bs, mask, batches, t, v)
    return jax.tree.map(jnp.multiply, masks_lib.apply(params, mask), hg)


def _x64(dtype):
    if np.dtype(dtype).itemsize <= 4:
        return contextlib.nullcontext()
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64  # older JAX
    return enable_x64()


def synflow_scores(model, variables: dict, mask: PyTree, image_shape: Sequence[int], *,
                   dtype=jnp.float64) -> PyTree:
    """SynFlow scores ``|dR/dtheta * theta|`` with ``R = 1^T f(1)`` on the positive network.

    Every parameter (biases and norm scales/offsets included) and every running statistic is
    replaced by its absolute value, pruned weights by 0, as the reference
    (``ganguli-lab/Synaptic-Flow``, ``SynFlow.score``/``linearize``) does; the input is one
    all-ones image of shape ``image_shape`` (H, W, C); BatchNorm runs in eval mode (running
    stats; at init mean 0 and var 1, so BN is a positive scaling). With positive weights and
    inputs the ReLUs are in their linear regime. Per-sample norms (instance/group) subtract
    means and break that positivity, as they would in the reference.

    Overflow: R is a sum over input-output paths of weight products and overflows float32 in
    deep nets (a rescale per layer is not exact with biases or skip connections), so the pass
    runs in ``dtype`` = float64 (inside a local ``enable_x64`` context) and the scores are
    returned as float64 arrays; :func:`dp_jax.masks.prune` ranks them in float64 (read them with
    NumPy: ``jnp`` ops outside x64 mode truncate to float32). Use ``dtype=jnp.float32`` on
    backends without float64 (TPU) and check the scores are finite.
    """
    params, bs = variables["params"], variables.get("batch_stats") or {}
    fn = _compiled(_build_synflow, model)
    shape = tuple(int(d) for d in image_shape)
    with _x64(dtype), _fast():
        return fn(params, bs, mask, image_shape=shape, dtype=np.dtype(dtype))


def _alive(mask: PyTree) -> dict[str, int]:
    return {k: int(np.asarray(v).sum()) for k, v in masks_lib.prunable_leaves(mask).items()}


def _nest(path: str, leaf) -> dict:
    # "a/b/kernel" -> {"a": {"b": {"kernel": leaf}}}: a one-layer tree masks.prune accepts.
    for part in reversed(path.split("/")):
        leaf = {part: leaf}
    return leaf


def _prune_layers(prune_fn, scores, mask, todo: dict[str, tuple[int, int]]) -> PyTree:
    """Remove exactly ``n`` of the ``alive`` weights of each layer in ``todo = {k: (n, alive)}``."""
    s_leaves, m_leaves = masks_lib.prunable_leaves(scores), masks_lib.prunable_leaves(mask)
    new = {}
    for k, (n, alive) in todo.items():
        # One call per layer: a shared fraction cannot give every layer its exact count.
        sub = prune_fn(_nest(k, s_leaves[k]), _nest(k, m_leaves[k]), n / alive, scope="layerwise")
        new[k] = masks_lib.prunable_leaves(sub)[k]
    return jax.tree_util.tree_map_with_path(
        lambda p, leaf: new.get(masks_lib.path_str(p), leaf), mask)


def synflow_prune(model, variables: dict, mask: PyTree, image_shape: Sequence[int], *,
                  target_density: float, iters: int = 100, scope: str = "global",
                  prune_fn: Optional[Callable] = None, dtype=jnp.float64) -> PyTree:
    """Iterative SynFlow from the density ``d0`` of ``mask`` down to ``target_density``.

    Iteration ``i = 1..iters`` rescores at the current mask and prunes the alive weights to
    density ``d_i = d0 * (target/d0)**(i/iters)`` (the paper's exponential schedule). Counts are
    exact: iteration ``i`` keeps ``round(d_i * total)`` weights (``scope="global"``), or
    ``round(d_i / d0 * alive0_l)`` of each layer ``l`` (``"layerwise"``); the last iteration keeps
    ``round(target_density * total)`` (resp. ``round(target_density / d0 * alive0_l)``).

    ``prune_fn(scores, mask, fraction, scope=...)`` defaults to :func:`dp_jax.masks.prune`, which
    removes ``round(fraction * alive)``: the fraction is derived from the wanted count. Layerwise
    calls it once per layer on a one-layer sub-tree. Raises ``FloatingPointError`` if the scores
    overflow (float32) and ``ValueError`` if the target would empty the net or a layer.
    """
    prune_fn = masks_lib.prune if prune_fn is None else prune_fn
    if scope not in ("global", "layerwise"):
        raise ValueError(f"synflow scope must be 'global' or 'layerwise', got {scope!r}")
    iters = int(iters)
    if iters < 1:
        raise ValueError(f"synflow iters must be >= 1, got {iters}")
    alive0, total = _alive(mask), masks_lib.count(mask)[1]
    d0 = sum(alive0.values()) / max(total, 1)
    if not 0.0 < target_density <= d0:
        raise ValueError(f"target_density must be in (0, {d0:.6g}] (the mask's density), "
                         f"got {target_density}")

    def keep_at(i):  # exact number of weights to keep after iteration i
        ratio = target_density / d0 if i == iters else (target_density / d0) ** (i / iters)
        if scope == "global":
            return int(round(target_density * total if i == iters else d0 * ratio * total))
        return {k: int(round(ratio * a)) for k, a in alive0.items()}

    final = keep_at(iters)
    smallest = min(v for k, v in final.items() if alive0[k]) if scope == "layerwise" else final
    if smallest < 1:
        raise ValueError(f"target_density={target_density} leaves no weight in "
                         f"{'a layer' if scope == 'layerwise' else 'the network'}")
    for i in range(1, iters + 1):
        keep, alive = keep_at(i), _alive(mask)
        if scope == "global":
            n = sum(alive.values()) - keep
            todo = {None: (n, sum(alive.values()))} if n > 0 else {}
        else:
            todo = {k: (alive[k] - keep[k], alive[k]) for k in alive if alive[k] > keep[k]}
        if not todo:
            continue  # nothing to remove at this step (tiny nets); the scores would not change
        scores = synflow_scores(model, variables, mask, image_shape, dtype=dtype)
        if not all(np.isfinite(np.asarray(v)).all()
                   for v in masks_lib.prunable_leaves(scores).values()):
            raise FloatingPointError(f"SynFlow scores overflowed in {np.dtype(dtype).name}"
                                     + ("; use dtype=jnp.float64" if np.dtype(dtype).itemsize
                                        <= 4 else ""))
        if scope == "global":
            n, a = todo[None]
            mask = prune_fn(scores, mask, n / a, scope="global")
        else:
            mask = _prune_layers(prune_fn, scores, mask, todo)
    return mask


def force_scores(model, variables: dict, mask: PyTree,
                 batches: Sequence[tuple[Any, Any]]) -> PyTree:
    """FORCE saliency ``|theta * dL/dw|`` at ``w = theta * mask`` (de Jorge et al. 2021).

    Unlike :func:`snip_scores` the gradient is taken with respect to the *sparsified* weights
    ``w`` themselves, not through the mask, so a pruned weight keeps its gradient, and it is
    multiplied by the *original* weight ``theta``: pruned weights score as if they came back
    (the authors' ``apply_prune_mask(..., apply_hooks=False)`` and ``original_weights``).
    Gradients of the mean cross-entropy averaged over ``batches``; BatchNorm in train mode.
    """
    params, bs = variables["params"], variables.get("batch_stats") or {}
    dense = jax.tree.map(lambda m: jnp.ones(jnp.shape(m), bool), mask)
    with _fast():
        g = _mean_over(_compiled(_build_grad, model), masks_lib.apply(params, mask), bs, dense,
                       batches, jnp.float32(1.0))
    return jax.tree.map(lambda gi, w: jnp.abs(gi * w), g, params)


def force_prune(model, variables: dict, mask: PyTree, batches_at: Callable[[int], Sequence],
                *, fraction: float, iters: int, prune_fn: Callable,
                on_iteration: Optional[Callable[[int, PyTree], None]] = None) -> PyTree:
    """FORCE from ``mask`` (the round's start) to ``fraction`` of its survivors pruned.

    Iteration ``t = 1..iters`` scores the current mask ``c_{t-1}`` (``c_0 = mask``) with
    :func:`force_scores` on ``batches_at(t)`` and sets ``c_t = prune_fn(scores, mask, p_t)``:
    it re-chooses among *all* of ``mask``'s survivors, so a weight pruned at an earlier iteration
    can come back, while weights outside ``mask`` stay pruned (masks nest across rounds). The kept
    share of the survivors falls exponentially, ``1 - p_t = (1 - fraction)**(t / iters)``, and
    ``p_iters = fraction`` exactly. ``prune_fn(scores, mask, p)`` removes ``round(p * alive)``
    of ``mask``'s survivors (e.g. :func:`dp_jax.pruning.rounds.prune_step`).
    """
    if int(iters) < 1:
        raise ValueError(f"force iters must be >= 1, got {iters}")
    current = mask
    for t in range(1, int(iters) + 1):
        p = fraction if t == iters else 1.0 - (1.0 - fraction) ** (t / iters)
        scores = force_scores(model, variables, current, batches_at(t))
        current = prune_fn(scores, mask, p)
        if on_iteration is not None:
            on_iteration(t, current)
    return current
