"""The ConvNet of dataset distillation (DC/DSA/MTT): ``depth`` x [conv 3x3 -> norm -> ReLU -> pool] -> dense.

Faithful to the reference ``ConvNet``: convolutions keep their bias even before a norm layer;
``"instance"`` is GroupNorm with one group per channel and an affine transform; pooling is 2x2 with
stride 2. For single-channel inputs the first convolution pads by 3 instead of 1, as the reference
does, so 28x28 images become 32x32 feature maps and the classifier sees the same 4x4 (depth 3)
grid as for CIFAR.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from dp_jax.models.layers import check_poolable, conv, dense, flatten, norm_layer, symmetric_padding

CONVNET_NORMS = ("instance", "batch", "none")
CONVNET_POOLS = ("avg", "max")


class ConvNet(nn.Module):
    """MTT ConvNet. ``norm`` in ``CONVNET_NORMS``; ``pool`` in ``CONVNET_POOLS``.

    Parameters live under ``conv_{i}``, ``norm_{i}`` (absent for ``norm="none"``) and ``head``.
    ``pad_grayscale`` reproduces the reference's extra padding of the first conv for 1-channel input.
    """

    num_classes: int = 10
    width: int = 128
    depth: int = 3
    norm: str = "instance"
    pool: str = "avg"
    pad_grayscale: bool = True

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        if self.norm not in CONVNET_NORMS:
            raise ValueError(f"convnet: norm must be one of {list(CONVNET_NORMS)}, got {self.norm!r}")
        if self.pool not in CONVNET_POOLS:
            raise ValueError(f"convnet: pool must be one of {list(CONVNET_POOLS)}, got {self.pool!r}")
        grayscale = self.pad_grayscale and x.shape[-1] == 1
        for i in range(self.depth):
            padding = symmetric_padding(3, extra=2 if (i == 0 and grayscale) else 0)
            x = conv(self.width, 3, padding=padding, use_bias=True, name=f"conv_{i}")(x)
            norm = norm_layer(self.norm, self.width, train=train, name=f"norm_{i}")
            if norm is not None:
                x = norm(x)
            x = nn.relu(x)
            check_poolable(x, "convnet", i)
            if self.pool == "avg":
                x = nn.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID")
            else:
                x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
        return dense(self.num_classes, name="head")(flatten(x))
