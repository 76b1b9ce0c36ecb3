"""ResNets built from BasicBlocks: ResNet-18 with the CIFAR stem, ResNet-10 with the ImageNet stem.

Layout (He et al. 2016, as in the common CIFAR re-implementations): stage ``s`` has ``num_blocks[s]``
BasicBlocks of width ``base * 2**s`` and stride (1, 2, 2, 2)[s] on its first block; a 1x1 projection
conv + norm forms the shortcut wherever stride or width changes; global average pool; dense
classifier. Convolutions followed by a norm carry no bias. ``base = round(width * width_multiplier)``:
64 is the standard network, 32 the half-width IDC variant.

Stems: ``"cifar"`` is a 3x3 stride-1 conv (no max-pool); ``"imagenet"`` a 7x7 stride-2 conv followed
by a 3x3 stride-2 max-pool, both padded as in torchvision.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from dp_jax.models.layers import conv, dense, norm_layer

RESNET_NORMS = ("batch", "group", "instance")
RESNET_STEMS = ("cifar", "imagenet")


class BasicBlock(nn.Module):
    """conv3x3 -> norm -> ReLU -> conv3x3 -> norm, plus (projected) shortcut, then ReLU."""

    features: int
    stride: int = 1
    norm: str = "batch"

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        y = conv(self.features, 3, stride=self.stride, use_bias=False, name="conv1")(x)
        y = norm_layer(self.norm, self.features, train=train, name="norm1")(y)
        y = nn.relu(y)
        y = conv(self.features, 3, use_bias=False, name="conv2")(y)
        y = norm_layer(self.norm, self.features, train=train, name="norm2")(y)
        if self.stride != 1 or x.shape[-1] != self.features:
            x = conv(
                self.features, 1, stride=self.stride, use_bias=False, padding="VALID", name="shortcut_conv"
            )(x)
            x = norm_layer(self.norm, self.features, train=train, name="shortcut_norm")(x)
        return nn.relu(x + y)


class ResNet(nn.Module):
    """BasicBlock ResNet. Parameters live under ``stem_conv``, ``stem_norm``,
    ``stage{s}_block{b}/{conv1,norm1,conv2,norm2[,shortcut_conv,shortcut_norm]}`` and ``head``.
    """

    num_classes: int = 10
    num_blocks: Sequence[int] = (2, 2, 2, 2)
    width: int = 64
    width_multiplier: float = 1.0
    norm: str = "batch"
    stem: str = "cifar"

    @property
    def base_width(self) -> int:
        """Channels of the stem and first stage."""
        return max(1, int(round(self.width * self.width_multiplier)))

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        if self.norm not in RESNET_NORMS:
            raise ValueError(f"resnet: norm must be one of {list(RESNET_NORMS)}, got {self.norm!r}")
        base = self.base_width
        if self.stem == "cifar":
            x = conv(base, 3, use_bias=False, name="stem_conv")(x)
            x = nn.relu(norm_layer(self.norm, base, train=train, name="stem_norm")(x))
        elif self.stem == "imagenet":
            x = conv(base, 7, stride=2, use_bias=False, name="stem_conv")(x)
            x = nn.relu(norm_layer(self.norm, base, train=train, name="stem_norm")(x))
            # Padding with -inf (Flax's max_pool init value) matches PyTorch's MaxPool2d(3, 2, 1).
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        else:
            raise ValueError(f"resnet: stem must be one of {list(RESNET_STEMS)}, got {self.stem!r}")
        for s, n in enumerate(self.num_blocks):
            features = base * 2**s
            for b in range(n):
                stride = 2 if (s > 0 and b == 0) else 1
                x = BasicBlock(features, stride=stride, norm=self.norm, name=f"stage{s + 1}_block{b}")(
                    x, train=train
                )
        x = jnp.mean(x, axis=(1, 2))
        return dense(self.num_classes, name="head")(x)


def resnet18(
    num_classes: int = 10,
    *,
    width: int = 64,
    width_multiplier: float = 1.0,
    norm: str = "batch",
    num_blocks: Sequence[int] = (2, 2, 2, 2),
) -> ResNet:
    """ResNet-18 with the CIFAR stem (3x3 conv, no max-pool). ``width=32`` is the IDC half-width net."""
    return ResNet(
        num_classes=num_classes,
        num_blocks=tuple(num_blocks),
        width=width,
        width_multiplier=width_multiplier,
        norm=norm,
        stem="cifar",
    )


def resnet10(
    num_classes: int = 1000,
    *,
    width: int = 64,
    width_multiplier: float = 1.0,
    norm: str = "batch",
) -> ResNet:
    """ResNet-10 (one BasicBlock per stage) with the ImageNet stem, for ImageNet subsets."""
    return ResNet(
        num_classes=num_classes,
        num_blocks=(1, 1, 1, 1),
        width=width,
        width_multiplier=width_multiplier,
        norm=norm,
        stem="imagenet",
    )
