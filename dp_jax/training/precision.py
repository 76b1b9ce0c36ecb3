"""Compute precision: the dtype the forward and backward passes run in (``train.compute_dtype``).

Parameters, masks, optimiser state, BatchNorm statistics, losses and metrics are stored in
float32 whatever the compute dtype; a step casts copies of the weights and inputs to the compute
dtype, so the gradient arrives in float32 through the cast and pruned weights stay exactly zero
(their updates are masked in float32).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any
COMPUTE_DTYPES = ("float32", "bfloat16")


def to_compute(tree: PyTree, compute_dtype: str) -> PyTree:
    """``tree``'s floating leaves in ``compute_dtype`` (a no-op for float32)."""
    if compute_dtype == "float32":
        return tree
    dt = jnp.dtype(compute_dtype)
    return jax.tree.map(lambda a: a.astype(dt) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                        tree)


def from_compute(tree: PyTree, compute_dtype: str) -> PyTree:
    """Results of a ``compute_dtype`` pass (logits, BatchNorm statistics) back in float32, for
    the loss and for storage; a no-op for float32, so float64 runs (tests) keep float64."""
    if compute_dtype == "float32":
        return tree
    return jax.tree.map(lambda a: a.astype(jnp.float32)
                        if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)
