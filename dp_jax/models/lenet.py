"""LeNet-300-100: the fully connected MNIST network of the lottery-ticket literature."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from dp_jax.models.layers import dense, flatten


class LeNet300100(nn.Module):
    """flatten -> Dense 300 -> ReLU -> Dense 100 -> ReLU -> Dense ``num_classes``.

    Parameters live under ``fc1``, ``fc2`` and ``head``; no normalisation, so no ``batch_stats``.
    """

    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        del train  # No train/eval-dependent layers.
        x = flatten(x)
        x = nn.relu(dense(300, name="fc1")(x))
        x = nn.relu(dense(100, name="fc2")(x))
        return dense(self.num_classes, name="head")(x)
