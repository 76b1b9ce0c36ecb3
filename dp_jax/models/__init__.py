"""Model zoo: a registry by name, config-driven construction, initialisation and pruning helpers.

Every model is a Flax Linen module called as ``model.apply(variables, x, train=...)`` with ``x``
float32 NHWC (any H, W, C) and returns logits ``(B, num_classes)``. Prunable weights are the leaves
named ``kernel`` (conv HWIO, dense (in, out)); biases are ``bias``; norms hold ``scale``/``bias``;
BatchNorm models also carry a ``batch_stats`` collection (running mean/var, momentum 0.9, eps 1e-5),
updated by ``apply(..., train=True, mutable=["batch_stats"])`` and read when ``train=False``.
Every model's classifier is a top-level dense layer named ``head``; ``apply_features`` returns
what enters it (the embedding distribution matching uses).
:func:`dp_jax.models.contract.check` checks all of this, abstractly, when a model is first built.

Config fields (:class:`~dp_jax.models.spec.ModelSpec`; ``None`` or absent means "model default"):

  =============== =========================================================================
  model           accepted fields (defaults)
  =============== =========================================================================
  lenet_300_100   (none)
  convnet         width (128), depth (3), norm ("instance"|"batch"|"none"), pool ("avg"|"max")
  resnet18        width (64), width_multiplier (1.0), norm ("batch"|"group"|"instance"),
                  num_blocks ((2, 2, 2, 2))
  resnet10        width (64), width_multiplier (1.0), norm ("batch"|"group"|"instance")
  alexnet         (none)
  =============== =========================================================================
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from dp_jax.models.alexnet import AlexNet
from dp_jax.models.convnet import CONVNET_NORMS, CONVNET_POOLS, ConvNet
from dp_jax.models.features import apply_features
from dp_jax.models.lenet import LeNet300100
from dp_jax.models.resnet import RESNET_NORMS, BasicBlock, ResNet, resnet10, resnet18
from dp_jax.models.spec import ModelSpec

__all__ = [
    "CONFIG_FIELDS",
    "ModelSpec",
    "MODELS",
    "MODEL_FIELDS",
    "AlexNet",
    "BasicBlock",
    "ConvNet",
    "LeNet300100",
    "ResNet",
    "apply_features",
    "count_params",
    "create_model",
    "init_variables",
    "is_prunable",
    "register",
    "resnet10",
    "resnet18",
]

MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet_300_100": LeNet300100,
    "convnet": ConvNet,
    "resnet18": resnet18,
    "resnet10": resnet10,
    "alexnet": AlexNet,
}

_BUILTIN = frozenset(MODELS)

# Every architecture field a model config may set; each model accepts a subset (MODEL_FIELDS).
CONFIG_FIELDS: tuple[str, ...] = ("width", "depth", "norm", "pool", "width_multiplier", "num_blocks")


def _positive_int(model: str, field: str, value: Any) -> int:
    # bool is an Integral subclass, but width=True is always a config mistake.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{model}: {field} must be a positive integer, got {value!r}")
    return int(value)


def _positive_float(model: str, field: str, value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{model}: {field} must be a positive finite number, got {value!r}")
    return float(value)


def _choice(allowed: Sequence[str]) -> Callable[[str, str, Any], str]:
    def check(model: str, field: str, value: Any) -> str:
        if value not in allowed:
            raise ValueError(f"{model}: {field} must be one of {sorted(allowed)}, got {value!r}")
        return value

    return check


def _four_positive_ints(model: str, field: str, value: Any) -> tuple[int, ...]:
    ok = isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 4
    if ok:
        ok = all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0 for v in value
        )
    if not ok:
        raise ValueError(
            f"{model}: {field} must be a sequence of 4 positive integers (blocks per stage), "
            f"got {value!r}"
        )
    return tuple(int(v) for v in value)


_VALIDATORS: dict[str, dict[str, Callable[[str, str, Any], Any]]] = {
    "lenet_300_100": {},
    "convnet": {
        "width": _positive_int,
        "depth": _positive_int,
        "norm": _choice(CONVNET_NORMS),
        "pool": _choice(CONVNET_POOLS),
    },
    "resnet18": {
        "width": _positive_int,
        "width_multiplier": _positive_float,
        "norm": _choice(RESNET_NORMS),
        "num_blocks": _four_positive_ints,
    },
    "resnet10": {
        "width": _positive_int,
        "width_multiplier": _positive_float,
        "norm": _choice(RESNET_NORMS),
    },
    "alexnet": {},
}

# The config fields each model accepts, for callers that validate configs up front.
MODEL_FIELDS: dict[str, tuple[str, ...]] = {k: tuple(sorted(v)) for k, v in _VALIDATORS.items()}


def register(name: str, factory: Callable[..., nn.Module], *,
             fields: Mapping[str, Callable[[Any], Any]] | Sequence[str] = ()) -> None:
    """Add model ``name``: ``factory(num_classes=..., **fields)`` returns a Flax module.

    ``fields`` are the architecture fields the model accepts: a sequence of names (values passed
    as they are) or ``{name: check(value) -> value}`` (raise ValueError on a bad value). A name
    already registered (a built-in included) is refused.
    """
    if not name or name in MODELS:
        raise ValueError(f"model {name!r} is already registered" if name else
                         "a model needs a name")
    checks = dict(fields) if isinstance(fields, Mapping) else {f: (lambda v: v) for f in fields}
    MODELS[name] = factory
    _VALIDATORS[name] = {f: (lambda model, field, value, check=check: check(value))
                         for f, check in checks.items()}
    MODEL_FIELDS[name] = tuple(sorted(checks))


def create_model(model: ModelSpec | Mapping, *, num_classes: int) -> nn.Module:
    """Build the registered model ``model.name`` with the architecture fields that are set.

    ``model`` is a :class:`ModelSpec` or a mapping such as ``{"name": "convnet", "width": 32}``.
    Raises ``ValueError`` for an unknown name, a field the model does not accept, or an invalid value.
    """
    spec = model if isinstance(model, ModelSpec) else ModelSpec.from_config(model)
    name = spec.name
    if not isinstance(name, str) or name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {sorted(MODELS)}")
    validators = _VALIDATORS[name]
    kwargs: dict[str, Any] = {}
    for field, value in spec.fields:
        if field not in validators:
            raise ValueError(
                f"config field {field!r} is not accepted by model {name!r}; "
                f"it accepts: {list(MODEL_FIELDS[name])}"
            )
        kwargs[field] = validators[field](name, field, value)
    if "width_multiplier" in validators:
        # The modules round width * width_multiplier to whole channels.
        base = kwargs.get("width", 64) * kwargs.get("width_multiplier", 1.0)
        if round(base) < 1:
            raise ValueError(
                f"{name}: width * width_multiplier must round to at least 1 channel, got {base!r}"
            )
    num_classes = _positive_int(name, "num_classes", num_classes)
    return MODELS[name](num_classes=num_classes, **kwargs)


def _init(model: nn.Module, key: jax.Array, image_shape: tuple[int, ...]) -> Any:
    # lazy_init skips the forward pass; the variables equal model.init(key, zeros, train=False) up to
    # float rounding in the PRNG transforms.
    x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    return model.lazy_init(key, x, train=False)


# One compiled program per (model, image shape), cached across calls: initialising ResNet-18 op by op
# costs seconds of per-shape PRNG compilation on XLA:CPU, a single program about half of that.
_init_jit = jax.jit(_init, static_argnums=(0, 2))


def init_variables(model: nn.Module, key: jax.Array, image_shape: Sequence[int]) -> dict:
    """Initialise ``model`` for NHWC images of shape ``image_shape`` (H, W, C) with a batch of one.

    Returns ``{"params": ...}`` plus ``"batch_stats"`` for BatchNorm models, as plain nested dicts.
    """
    image_shape = tuple(int(d) for d in image_shape)
    try:
        hash(model)
    except TypeError:  # A module built by hand with unhashable attributes cannot be a static arg.
        return flax.core.unfreeze(jax.jit(lambda k: _init(model, k, image_shape))(key))
    return flax.core.unfreeze(_init_jit(model, key, image_shape))


def _key_name(key: Any) -> str:
    # Accept plain strings as well as jax.tree_util key-path entries (DictKey, GetAttrKey, ...).
    for attr in ("key", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _shape(leaf: Any) -> tuple[int, ...]:
    # ShapeDtypeStruct (from jax.eval_shape) has .shape but is not array-like.
    shape = getattr(leaf, "shape", None)
    return tuple(shape) if shape is not None else jnp.shape(leaf)


def is_prunable(path: tuple, leaf: Any) -> bool:
    """True for conv and dense kernels: leaves named ``kernel`` with ndim >= 2 (first/last layer included).

    ``path`` may hold strings or ``jax.tree_util`` key entries, so this works directly with
    ``jax.tree_util.tree_map_with_path``.
    """
    return bool(path) and _key_name(path[-1]) == "kernel" and len(_shape(leaf)) >= 2


def count_params(params: Any) -> int:
    """Total number of scalars in a pytree of arrays (or ``jax.ShapeDtypeStruct``s)."""
    return sum(math.prod(_shape(leaf)) for leaf in jax.tree_util.tree_leaves(params))
