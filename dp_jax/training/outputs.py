"""What a training loop hands back besides its state: weight snapshots and per-epoch
metrics checked for divergence (shared by :mod:`dp_jax.training.trainer` and :mod:`dp_jax.training.stream`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def snapshot(state) -> dict:
    """Copies of a train state's ``params`` and ``batch_stats`` (the weights at one step)."""
    # Copies, because the next step donates (and so invalidates) the state's buffers.
    return jax.tree.map(jnp.copy, {"params": state.params, "batch_stats": state.batch_stats})


class TrainingDivergedError(RuntimeError):
    """Raised when the loss becomes NaN/inf; names the step range."""


def check_finite(metrics: dict, first_step: int, last_step: int) -> dict:
    """Mean of per-step metrics; raises TrainingDivergedError on NaN/inf loss."""
    host = jax.device_get(metrics)
    loss = np.asarray(host["loss"])
    if not np.all(np.isfinite(loss)):
        bad = first_step + int(np.flatnonzero(~np.isfinite(loss))[0])
        raise TrainingDivergedError(
            f"loss is not finite at step {bad} (steps {first_step}-{last_step}); "
            "lower train.lr or check the data")
    return {k: float(np.mean(v)) for k, v in host.items()}
