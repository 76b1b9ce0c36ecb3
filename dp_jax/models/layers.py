"""Shared building blocks for the model zoo: initialisers, padding and normalisation layers.

Initialisation (deliberately not PyTorch's defaults):
  * conv kernels: Kaiming/He normal, fan-in, ReLU gain (variance 2 / fan_in), untruncated — the same
    distribution as ``torch.nn.init.kaiming_normal_(mode="fan_in")``. PyTorch's *default* conv init is
    Kaiming-uniform with a = sqrt(5) (variance 1 / (3 fan_in)), which starts deep ReLU nets with
    shrinking activations.
  * dense kernels: Flax's default LeCun normal (truncated, variance 1 / fan_in); PyTorch's default is
    U(+-1 / sqrt(fan_in)), variance 1 / (3 fan_in).
  * all biases zero (PyTorch draws them from U(+-1 / sqrt(fan_in))); norm scales one and offsets zero,
    as in PyTorch.

Padding is explicit and symmetric (PyTorch-style ``padding=k // 2``) rather than ``'SAME'``: for
strided convolutions on even inputs XLA's ``'SAME'`` pads (0, 1) where PyTorch pads (1, 1), which
would shift every strided feature map by one pixel relative to the reference architectures.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp

# Variance 2 / fan_in, plain (untruncated) normal: matches kaiming_normal_ with the ReLU gain.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")

BN_MOMENTUM = 0.9  # Flax convention: running = m * running + (1 - m) * batch (PyTorch momentum 0.1).
NORM_EPSILON = 1e-5  # PyTorch's default for BatchNorm / GroupNorm / InstanceNorm.
MAX_GROUPS = 32


def symmetric_padding(kernel_size: int, extra: int = 0) -> tuple[tuple[int, int], tuple[int, int]]:
    """PyTorch-style padding of ``kernel_size // 2 + extra`` on every side of H and W."""
    p = kernel_size // 2 + extra
    return ((p, p), (p, p))


def conv(
    features: int,
    kernel_size: int,
    *,
    stride: int = 1,
    use_bias: bool = True,
    padding=None,
    name: str | None = None,
) -> nn.Conv:
    """A plain ``nn.Conv`` (kernel HWIO named ``kernel``) with Kaiming-normal init and zero bias."""
    if padding is None:
        padding = symmetric_padding(kernel_size)
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=(stride, stride),
        padding=padding,
        use_bias=use_bias,
        kernel_init=conv_kernel_init,
        bias_init=nn.initializers.zeros,
        name=name,
    )


def dense(features: int, *, name: str | None = None) -> nn.Dense:
    """A plain ``nn.Dense`` (kernel (in, out) named ``kernel``) with LeCun-normal init and zero bias."""
    return nn.Dense(features, bias_init=nn.initializers.zeros, name=name)


def num_groups_for(channels: int, max_groups: int = MAX_GROUPS) -> int:
    """Largest group count <= ``max_groups`` that divides ``channels`` (32 for the usual widths)."""
    for g in range(min(max_groups, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


def norm_layer(kind: str, channels: int, *, train: bool, name: str | None = None):
    """Normalisation over NHWC features; returns ``None`` for ``kind == "none"``.

    ``"batch"``: BatchNorm (running stats in ``batch_stats``, used when ``train`` is False);
    ``"instance"``: GroupNorm with one group per channel, affine — what MTT calls ``instancenorm``;
    ``"group"``: GroupNorm with ``num_groups_for(channels)`` groups.
    """
    if kind == "batch":
        return nn.BatchNorm(
            use_running_average=not train,
            momentum=BN_MOMENTUM,
            epsilon=NORM_EPSILON,
            name=name,
        )
    if kind == "instance":
        return nn.GroupNorm(num_groups=channels, epsilon=NORM_EPSILON, name=name)
    if kind == "group":
        return nn.GroupNorm(num_groups=num_groups_for(channels), epsilon=NORM_EPSILON, name=name)
    if kind == "none":
        return None
    raise ValueError(f"unknown norm {kind!r}; allowed: ['batch', 'group', 'instance', 'none']")


def flatten(x: jnp.ndarray) -> jnp.ndarray:
    """(B, ...) -> (B, prod(...)). NHWC order, so weights are not interchangeable with NCHW flattening."""
    return x.reshape((x.shape[0], math.prod(x.shape[1:])))


def check_poolable(x: jnp.ndarray, model: str, layer: int) -> None:
    """Fail with a readable message instead of a zero-sized feature map after a 2x2 pool."""
    if x.shape[1] < 2 or x.shape[2] < 2:
        raise ValueError(
            f"{model}: feature map {x.shape[1]}x{x.shape[2]} before pool {layer} is too small for a 2x2 "
            "pool; use a larger image or a smaller depth"
        )
