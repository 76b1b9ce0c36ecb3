"""AlexNet for small images, as in the dataset-distillation / Distilled Pruning (2023) code.

conv 5x5 128 -> ReLU -> maxpool 2 -> conv 5x5 192 -> ReLU -> maxpool 2 -> conv 3x3 256 -> ReLU ->
conv 3x3 192 -> ReLU -> conv 3x3 192 -> ReLU -> maxpool 2 -> flatten -> dense. All convolutions have
biases and size-preserving padding; no normalisation, no dropout, a single linear classifier.
For single-channel inputs the first convolution pads by 4 instead of 2, as the reference does, so
28x28 images give the same 4x4x192 classifier input as 32x32 ones.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from dp_jax.models.layers import check_poolable, conv, dense, flatten, symmetric_padding

# (features, kernel size, max-pool after?)
ALEXNET_LAYERS = ((128, 5, True), (192, 5, True), (256, 3, False), (192, 3, False), (192, 3, True))


class AlexNet(nn.Module):
    """Parameters live under ``conv_{0..4}`` and ``head``; no ``batch_stats``."""

    num_classes: int = 10
    pad_grayscale: bool = True

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        del train  # No train/eval-dependent layers.
        grayscale = self.pad_grayscale and x.shape[-1] == 1
        for i, (features, k, pool) in enumerate(ALEXNET_LAYERS):
            padding = symmetric_padding(k, extra=2 if (i == 0 and grayscale) else 0)
            x = nn.relu(conv(features, k, padding=padding, use_bias=True, name=f"conv_{i}")(x))
            if pool:
                check_poolable(x, "alexnet", i)
                x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
        return dense(self.num_classes, name="head")(flatten(x))
