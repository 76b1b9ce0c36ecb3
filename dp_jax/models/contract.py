"""Check that a model keeps the model contract before anything trains it.

The contract (``docs/extending.md``, "A model"): ``model.apply(variables, x, train=...)`` on float32
NHWC images returns logits ``(batch, num_classes)``; the prunable weights are the leaves named
``kernel`` with ndim >= 2; all parameters are floating point; a BatchNorm model carries a float
``batch_stats`` collection that ``apply(..., train=True, mutable=["batch_stats"])`` updates; the
classifier is a top-level dense layer named ``head`` and :func:`~dp_jax.models.apply_features`
returns what enters it.

A user model that breaks a rule otherwise fails deep inside a compiled training step (or, worse,
trains without pruning anything); :func:`check` says which rule, in terms of the model, at build
time. Everything is traced abstractly, so a check costs tracing, never a forward pass, and a
passed check is cached.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dp_jax.models import is_prunable
from dp_jax.models.features import HEAD, apply_features

__all__ = ["check"]

# Batch sizes of the abstract calls: init uses one image, as init_variables does; the train call
# uses two so that a model that hard-codes a batch of one is caught.
_INIT_BATCH = 1
_TRAIN_BATCH = 2


def check(model: nn.Module, image_shape: Sequence[int], num_classes: int, *,
          needs_head: bool = False, needs_features: bool = False) -> None:
    """Raise ``ValueError`` naming ``model`` and the rule it breaks; return None if it keeps them.

    Always checked, for float32 NHWC images of shape ``image_shape`` (H, W, C): the model applies
    without error; at least one prunable ``kernel`` (ndim >= 2); all parameters floating point;
    logits of shape ``(batch, num_classes)`` with ``train=False`` and ``train=True``; a
    ``batch_stats`` collection, if any, is floating point and updated by ``train=True`` with
    ``mutable=["batch_stats"]``.

    Args:
      model: the Flax module, as ``create_model`` or a user factory built it.
      image_shape: (H, W, C) of the dataset's images.
      num_classes: the number of logits expected.
      needs_head: also require a top-level dense layer ``head`` with ``num_classes`` outputs
        (for methods that read or reset the classifier).
      needs_features: also require :func:`~dp_jax.models.apply_features` to return
        ``(batch, features)`` with ``train=True`` (for distribution matching).
      ``build_setup`` checks every model with neither flag; the code that needs more asks.

    A passed check is cached per (model, image_shape, num_classes, flags), so building the same
    model again costs nothing; a model with unhashable attributes is checked every time.
    """
    args = (model, tuple(int(d) for d in image_shape), int(num_classes),
            bool(needs_head), bool(needs_features))
    if len(args[1]) != 3:
        raise ValueError(f"image_shape must be (H, W, C), got {tuple(image_shape)}")
    try:
        hash(args)
    except TypeError:  # A module with unhashable attributes (a list, a dict) cannot key a cache.
        _check(*args)
        return
    _check_cached(*args)


def _check(model: nn.Module, image_shape: tuple[int, ...], num_classes: int,
           needs_head: bool, needs_features: bool) -> None:
    name = _model_name(model)
    variables, logits = _abstract_init(model, name, image_shape)
    params = variables.get("params", {})
    stats = variables.get("batch_stats", {})
    _check_params(name, params)
    _check_float(name, "batch_stats", stats)
    _check_logits(name, logits, (_INIT_BATCH, *image_shape), num_classes, train=False)
    _check_train(model, name, variables, image_shape, num_classes)
    if needs_head:
        _check_head(name, params, num_classes)
    if needs_features:
        _check_features(model, name, variables, image_shape)


# Failures are not cached (lru_cache does not store exceptions), so a fixed model is re-checked.
_check_cached = functools.lru_cache(maxsize=256)(_check)


def _model_name(model: Any) -> str:
    return type(model).__name__


def _input(batch: int, image_shape: tuple[int, ...]) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((batch, *image_shape), jnp.float32)


def _failed(name: str, x: jax.ShapeDtypeStruct, err: Exception, how: str = "") -> ValueError:
    return ValueError(f"model {name} failed on a {tuple(x.shape)} input{how}: "
                      f"{type(err).__name__}: {err}")


def _abstract_init(model: nn.Module, name: str, image_shape: tuple[int, ...]) -> tuple[dict, Any]:
    """Variable and eval-mode logit shapes from one abstract ``init_with_output``."""
    x = _input(_INIT_BATCH, image_shape)
    try:
        logits, variables = jax.eval_shape(
            lambda k, xx: model.init_with_output(k, xx, train=False), jax.random.key(0), x)
    except Exception as err:  # Any error in user model code: re-raised with the model's name.
        raise _failed(name, x, err) from err
    return dict(variables), logits


def _path(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _check_params(name: str, params: Any) -> None:
    _check_float(name, "params", params)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    if not any(is_prunable(path, leaf) for path, leaf in flat):
        kernels = [f"{_path(p)} {tuple(leaf.shape)}" for p, leaf in flat
                   if _path(p).endswith("kernel")]
        raise ValueError(f"model {name} has no prunable leaf: pruning needs parameters named "
                         f"'kernel' with ndim >= 2 (kernels found: {kernels or 'none'})")


def _check_float(name: str, collection: str, tree: Any) -> None:
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise ValueError(f"model {name}: {collection} leaf {_path(path)!r} has dtype "
                             f"{np.dtype(leaf.dtype).name}; every {collection} leaf must be "
                             f"floating point")


def _check_logits(name: str, logits: Any, input_shape: tuple[int, ...], num_classes: int, *,
                  train: bool) -> None:
    expected = (input_shape[0], num_classes)
    shape = getattr(logits, "shape", None)
    found = tuple(shape) if shape is not None else f"a {type(logits).__name__}, not an array"
    if shape is None or tuple(shape) != expected:
        raise ValueError(f"model {name} returned logits of shape {found} for a {input_shape} "
                         f"input with train={train}; expected (batch, num_classes) = {expected}")


def _check_train(model: nn.Module, name: str, variables: dict, image_shape: tuple[int, ...],
                 num_classes: int) -> None:
    """``train=True`` gives logits, and a new value for every ``batch_stats`` leaf.

    Traced with ``make_jaxpr`` rather than ``eval_shape``: a statistic the model never updates
    (e.g. BatchNorm with ``use_running_average=True`` regardless of ``train``) comes back as the
    very input variable, which only the jaxpr shows.
    """
    x = _input(_TRAIN_BATCH, image_shape)
    try:
        closed, (logits, updates) = jax.make_jaxpr(
            lambda v, xx: model.apply(v, xx, train=True, mutable=["batch_stats"]),
            return_shape=True)(variables, x)
    except Exception as err:  # Any error in user model code: re-raised with the model's name.
        raise _failed(name, x, err, " with train=True") from err
    _check_logits(name, logits, tuple(x.shape), num_classes, train=True)
    stats = variables.get("batch_stats", {})
    if not stats:
        return
    new = updates.get("batch_stats", {})
    if jax.tree_util.tree_structure(new) != jax.tree_util.tree_structure(stats):
        before, after = set(_leaf_names(stats)), set(_leaf_names(new))
        raise ValueError(f"model {name}: apply(train=True, mutable=['batch_stats']) must update "
                         f"the batch_stats init created; it added {sorted(after - before)} and "
                         f"left out {sorted(before - after)}")
    _check_float(name, "updated batch_stats", new)
    # Identity, not equality: an output that *is* an input variable was passed through unchanged.
    inputs = {id(v) for v in closed.jaxpr.invars}
    flat = jax.tree_util.tree_flatten_with_path((logits, updates))[0]
    stale = [_path(p[2:]) for (p, _), v in zip(flat, closed.jaxpr.outvars)
             if _path(p[1:2]) == "batch_stats" and id(v) in inputs]
    if stale:
        raise ValueError(f"model {name}: apply(train=True, mutable=['batch_stats']) does not "
                         f"update batch_stats {stale} (returned unchanged); BatchNorm must use "
                         f"batch statistics when train=True")


def _leaf_names(tree: Any) -> list[str]:
    return [_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _check_head(name: str, params: dict, num_classes: int) -> None:
    head = params.get(HEAD)
    kernel = head.get("kernel") if isinstance(head, Mapping) else None
    if kernel is None:
        raise ValueError(f"model {name} has no top-level dense layer {HEAD!r} (the classifier "
                         f"this method needs); top-level parameters: {sorted(params)}")
    if kernel.ndim != 2 or kernel.shape[1] != num_classes:
        raise ValueError(f"model {name}: top-level {HEAD!r} must be a dense layer with kernel "
                         f"(features, {num_classes}), got kernel shape {tuple(kernel.shape)}")


def _check_features(model: nn.Module, name: str, variables: dict,
                    image_shape: tuple[int, ...]) -> None:
    """``apply_features`` as distribution matching calls it: ``train=True``, stats mutable."""
    x = _input(_TRAIN_BATCH, image_shape)
    try:
        feats, _ = jax.eval_shape(
            lambda v, xx: apply_features(model, v, xx, train=True, mutable=["batch_stats"]),
            variables, x)
    except Exception as err:  # Any error, the missing-head ValueError included: name the model.
        raise ValueError(f"model {name}: apply_features failed on a {tuple(x.shape)} input: "
                         f"{type(err).__name__}: {err}") from err
    shape = getattr(feats, "shape", None)
    if shape is None or len(shape) != 2 or shape[0] != x.shape[0]:
        found = tuple(shape) if shape is not None else type(feats).__name__
        raise ValueError(f"model {name}: apply_features returned {found} for a "
                         f"{tuple(x.shape)} input; expected (batch, features) = "
                         f"({x.shape[0]}, D): {HEAD!r} must take a flat feature vector")
