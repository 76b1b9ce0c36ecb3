"""Tests for dp_jax.models.contract.check: a small module per broken rule, built-ins, the cache.

Everything is traced abstractly (no forward pass), so the file runs in seconds on a 2-core CPU.
"""

from __future__ import annotations

import types

import flax.linen as nn
import jax.numpy as jnp
import pytest

from dp_jax import models
from dp_jax.models import contract
from dp_jax.pruning import setup as setup_lib

IMAGE = (8, 8, 1)
CLASSES = 3


def _flat(x):
    return x.reshape((x.shape[0], -1))


class MLP(nn.Module):
    """A correct user model: flatten -> dense -> relu -> dense ``head``."""

    num_classes: int = CLASSES
    hidden: int = 16

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(nn.Dense(self.hidden)(_flat(x)))
        return nn.Dense(self.num_classes, name="head")(x)


class BNNet(nn.Module):
    """A correct BatchNorm model."""

    num_classes: int = CLASSES

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(4, (3, 3))(x)))
        return nn.Dense(self.num_classes, name="head")(_flat(x))


class NoKernel(nn.Module):
    """Its weight matrix is named ``weight``, so there is nothing to prune."""

    @nn.compact
    def __call__(self, x, train=False):
        x = _flat(x)
        w = self.param("weight", nn.initializers.lecun_normal(), (x.shape[-1], CLASSES))
        return x @ w


class FlatLogits(nn.Module):
    """Returns ``(batch * classes,)`` instead of ``(batch, classes)``."""

    @nn.compact
    def __call__(self, x, train=False):
        return nn.Dense(CLASSES, name="head")(_flat(x)).reshape(-1)


class BatchOfOne(nn.Module):
    """Averages over the batch: right shape for one image, wrong for two."""

    @nn.compact
    def __call__(self, x, train=False):
        return nn.Dense(CLASSES, name="head")(_flat(x)).mean(axis=0, keepdims=True)


class IntParam(nn.Module):
    """Keeps an integer counter among its parameters."""

    @nn.compact
    def __call__(self, x, train=False):
        self.param("steps", lambda key: jnp.zeros((), jnp.int32))
        return nn.Dense(CLASSES, name="head")(_flat(x))


class FrozenBN(nn.Module):
    """BatchNorm that always uses its running averages, so train=True never updates them."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.BatchNorm(use_running_average=True)(nn.Conv(4, (3, 3))(x))
        return nn.Dense(CLASSES, name="head")(_flat(x))


class LazyStats(nn.Module):
    """Creates different statistics in train mode than at init."""

    @nn.compact
    def __call__(self, x, train=False):
        bn = nn.BatchNorm(use_running_average=not train, use_scale=False, use_bias=False,
                          name="bn_train" if train else "bn")
        return nn.Dense(CLASSES, name="head")(_flat(bn(x)))


class IntStats(nn.Module):
    """Counts its training calls in an integer ``batch_stats`` leaf."""

    @nn.compact
    def __call__(self, x, train=False):
        count = self.variable("batch_stats", "count", lambda: jnp.zeros((), jnp.int32))
        if train:
            count.value += 1
        return nn.Dense(CLASSES, name="head")(_flat(x))


class NoHead(nn.Module):
    """A correct model whose classifier is named ``classifier``."""

    @nn.compact
    def __call__(self, x, train=False):
        return nn.Dense(CLASSES, name="classifier")(_flat(x))


class ConvHead(nn.Module):
    """Its ``head`` is a 1x1 convolution, followed by global average pooling."""

    @nn.compact
    def __call__(self, x, train=False):
        return nn.Conv(CLASSES, (1, 1), name="head")(x).mean(axis=(1, 2))


class SpatialHead(nn.Module):
    """A dense ``head`` applied per pixel: right logits, but features are not (batch, D)."""

    @nn.compact
    def __call__(self, x, train=False):
        return nn.Dense(CLASSES, name="head")(nn.Conv(4, (3, 3))(x)).mean(axis=(1, 2))


class TooSmall(nn.Module):
    """Raises on inputs smaller than 16x16."""

    @nn.compact
    def __call__(self, x, train=False):
        if x.shape[1] < 16:
            raise ValueError("needs at least 16x16 images")
        return nn.Dense(CLASSES, name="head")(_flat(x))


class DropoutNet(nn.Module):
    """Dropout in train mode needs a 'dropout' RNG, which the trainers never pass."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Dropout(0.5, deterministic=not train)(_flat(x))
        return nn.Dense(CLASSES, name="head")(x)


@pytest.mark.parametrize("module, flags, expected", [
    (NoKernel(), {}, "no prunable leaf"),
    (FlatLogits(), {}, "logits of shape (3,) for a (1, 8, 8, 1) input with train=False"),
    (BatchOfOne(), {}, "logits of shape (1, 3) for a (2, 8, 8, 1) input with train=True"),
    (IntParam(), {}, "params leaf 'steps' has dtype int32"),
    (FrozenBN(), {}, "does not update batch_stats ['BatchNorm_0/mean', 'BatchNorm_0/var']"),
    (LazyStats(), {}, "it added ['bn_train/mean', 'bn_train/var'] and left out []"),
    (IntStats(), {}, "batch_stats leaf 'count' has dtype int32"),
    (NoHead(), {"needs_head": True}, "no top-level dense layer 'head'"),
    (ConvHead(), {"needs_head": True}, "got kernel shape (1, 1, 1, 3)"),
    (NoHead(), {"needs_features": True}, "apply_features failed"),
    (SpatialHead(), {"needs_features": True}, "apply_features returned (2, 8, 8, 4)"),
    (TooSmall(), {}, "failed on a (1, 8, 8, 1) input: ValueError: needs at least 16x16"),
    (DropoutNet(), {}, "failed on a (2, 8, 8, 1) input with train=True"),
], ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else None)
def test_each_broken_rule_is_named(module, flags, expected):
    with pytest.raises(ValueError) as e:
        contract.check(module, IMAGE, CLASSES, **flags)
    msg = str(e.value)
    assert f"model {type(module).__name__}" in msg and expected in msg, msg


@pytest.mark.parametrize("module", [NoHead(), ConvHead(), SpatialHead()])
def test_head_and_features_are_only_checked_when_asked(module):
    contract.check(module, IMAGE, CLASSES)


@pytest.mark.parametrize("module", [MLP(), BNNet()])
def test_correct_user_models_pass(module):
    assert contract.check(module, IMAGE, CLASSES, needs_head=True, needs_features=True) is None


def test_wrong_num_classes_is_a_shape_error():
    with pytest.raises(ValueError, match=r"expected \(batch, num_classes\) = \(1, 5\)"):
        contract.check(MLP(), IMAGE, 5)


def test_image_shape_must_be_hwc():
    with pytest.raises(ValueError, match="image_shape must be"):
        contract.check(MLP(), (8, 8), CLASSES)


# Small widths: the check only traces, but tracing a full-width ResNet still costs seconds.
SMALL_FIELDS = {"convnet": {"width": 8}, "resnet18": {"width": 4}, "resnet10": {"width": 4}}
BUILTINS = [(name, SMALL_FIELDS.get(name, {})) for name in sorted(models.MODELS)] + [
    ("convnet", {"width": 8, "norm": "batch", "pool": "max"}),
    ("resnet18", {"width": 4, "norm": "group"}),
]


@pytest.mark.parametrize("name, fields", BUILTINS,
                         ids=[f"{n}-{'-'.join(map(str, f.values()))}" for n, f in BUILTINS])
def test_builtin_models_pass(name, fields):
    model = models.create_model({"name": name, **fields}, num_classes=10)
    contract.check(model, (32, 32, 3), 10, needs_head=True, needs_features=True)


class Counted(nn.Module):
    """MLP that counts its traced calls (a class attribute, not a dataclass field)."""

    calls = 0

    @nn.compact
    def __call__(self, x, train=False):
        type(self).calls += 1
        return nn.Dense(CLASSES, name="head")(_flat(x))


def test_a_passed_check_is_cached():
    contract.check(Counted(), IMAGE, CLASSES)
    first = Counted.calls
    assert first > 0
    contract.check(Counted(), IMAGE, CLASSES)  # an equal module: the same cache entry
    assert Counted.calls == first
    contract.check(Counted(), IMAGE, CLASSES, needs_features=True)  # other flags: checked again
    assert Counted.calls > first


class Unhashable(nn.Module):
    """A list attribute makes the module unhashable: it is checked every time."""

    sizes: list
    calls = 0

    @nn.compact
    def __call__(self, x, train=False):
        type(self).calls += 1
        return nn.Dense(self.sizes[-1], name="head")(_flat(x))


def test_unhashable_modules_are_checked_every_time():
    contract.check(Unhashable([CLASSES]), IMAGE, CLASSES)
    first = Unhashable.calls
    contract.check(Unhashable([CLASSES]), IMAGE, CLASSES)
    assert Unhashable.calls == 2 * first
    with pytest.raises(ValueError, match="expected"):
        contract.check(Unhashable([CLASSES + 1]), IMAGE, CLASSES)


def test_failures_are_not_cached():
    for _ in range(2):
        with pytest.raises(ValueError, match="no prunable leaf"):
            contract.check(NoKernel(), IMAGE, CLASSES)


def test_build_setup_checks_the_model_first(monkeypatch):
    # build_setup checks right after create_model, so nothing else of the config is read.
    monkeypatch.setattr(setup_lib, "create_model", lambda spec, num_classes: IntParam())
    config = types.SimpleNamespace(model={"name": "int_param"})
    dataset = types.SimpleNamespace(image_shape=IMAGE, num_classes=CLASSES)
    with pytest.raises(ValueError, match="model IntParam: params leaf 'steps' has dtype int32"):
        setup_lib.build_setup(config, dataset)
