"""Penultimate features of any zoo model: the input of its classifier layer ``head``.

Every model in the zoo ends in a dense layer named ``head`` applied to a flat feature vector
(ConvNet: the flattened last pooled map, as DC/DM's ``embed``; ResNets: the global average pool;
LeNet-300-100: the 100 hidden units). :func:`apply_features` runs the unchanged model and records
what reaches ``head`` with ``flax.linen.intercept_methods``, so no model's parameters, names or
outputs change.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

HEAD = "head"


def apply_features(model: nn.Module, variables: dict, x: jax.Array, *, train: bool = False,
                   mutable=False) -> Any:
    """``model.apply`` that returns the features entering the top-level ``head`` layer.

    Args:
      model: a zoo model (its classifier is the top-level submodule ``head``).
      variables: ``{"params": ...}`` plus ``"batch_stats"`` for BatchNorm models.
      x: NHWC input batch.
      train: passed to the model (BatchNorm uses batch statistics when True).
      mutable: as for ``model.apply`` (e.g. ``["batch_stats"]``).

    Returns:
      ``features`` of shape (B, D), or ``(features, updated_collections)`` when ``mutable``.
    """
    seen = []

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and context.module.path == (HEAD,):
            seen.append(args[0])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        out = model.apply(variables, x, train=train, mutable=mutable)
    if len(seen) != 1:
        raise ValueError(f"{type(model).__name__} has no single top-level '{HEAD}' layer "
                         f"(saw {len(seen)} calls); cannot take its features")
    return (seen[0], out[1]) if mutable else seen[0]
