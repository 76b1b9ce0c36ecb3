"""dp_jax from Python: the functions ``dp_jax`` exports at its top level (docs/api.md).

The command line calls the same functions: ``dp-jax run`` is :func:`run` with the config its
flags built, ``dp-jax report DIR ...`` what :func:`load_results` reads.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping, Optional, Sequence

from dp_jax.config import files as config_files
from dp_jax import models
from dp_jax.data import registry as data_registry
from dp_jax.system import compile_cache
from dp_jax.tasks import registry, settings
from dp_jax.tasks.results import Results, load_results

__all__ = ["Results", "load_config", "load_results", "run"]


def load_config(spec: str, overrides: Optional[Mapping[str, Any]] = None):
    """A config: ``spec`` is a shipped config's name or a path, optionally ``:variant``
    (``"fashion_mnist:smoke"``), and ``overrides`` dotted fields (``{"train.epochs": 2}``).

    Checked exactly as the command line checks it (every field, before any work): an unknown
    name, variant or field, or a bad value, is a ValueError naming it and the allowed values.

    >>> config = dp_jax.load_config("fashion_mnist:smoke", {"prune.method": "imp,dp"})
    """
    compile_cache.enable()  # an entry point, like the command line (DP_JAX_COMPILE_CACHE=off)
    config = config_files.load_config(config_files.resolve_config(spec))
    overrides = dict(overrides or {})
    extra = {k: v for k, v in overrides.items() if _model_field(config, k, overrides)}
    config_files.apply_overrides(config, {k: v for k, v in overrides.items() if k not in extra})
    for key, value in extra.items():  # fields of a registered model the base config lacks
        config.model[key.split(".", 1)[1]] = value
    settings.parse(config)
    return config


def _model_field(config, key: str, overrides: Mapping) -> bool:
    """Whether ``key`` is ``model.F`` for a field F that the config lacks but the (registered)
    model named by the config or the overrides accepts."""
    section, _, field = key.partition(".")
    if section != "model" or field in config.model:
        return False
    config_files.import_plugins("model.plugins",
                                overrides.get("model.plugins", config.model.plugins))
    name = overrides.get("model.name", config.model.name)
    return field in models.MODEL_FIELDS.get(name, ())


def run(config, workdir: str, *, progress: bool = True, restart_changed: bool = False,
        data: Optional[Sequence] = None) -> Results:
    """Run (or resume) the experiment of ``config`` in ``workdir``; returns its :class:`Results`.

    The task is ``config.task`` (``prune``: the pruning runs; ``distill``: a distillation and
    its evaluation). The guarantees are the command line's: the workdir's identity is checked
    before any work (other settings are refused unless ``restart_changed``), one process at a
    time holds its lock, and a killed run resumes to the same result.

    ``data=(x_train, y_train, x_test, y_test)`` trains on your arrays (images (N, H, W, C) or
    (N, H, W), uint8 pixels or floats in [0, 1]; integer labels): the run records their
    SHA-256, so resuming the workdir with other arrays is refused like any changed setting.

    >>> results = dp_jax.run(config, "runs/mine")
    >>> print(results.table())
    """
    compile_cache.enable()  # an entry point, like the command line (DP_JAX_COMPILE_CACHE=off)
    if data is not None:
        if len(data) != 4:
            raise ValueError("data must be (x_train, y_train, x_test, y_test), got "
                             f"{len(data)} arrays")
        config = copy.deepcopy(config)
        config.data.name = data_registry.put_arrays(*data)
    task = registry.get(config.get("task", "prune"))
    task(config, workdir, restart_changed=restart_changed, progress=progress)
    return load_results(workdir)
