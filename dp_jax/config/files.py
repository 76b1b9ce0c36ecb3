"""Config files: finding them (a path, or the name of a config shipped with the package) and
loading them (``configs/`` holds files, not a package)."""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Mapping
from typing import Any, Optional

PACKAGED_CONFIGS = "dp_jax_configs"  # configs/ as shipped in the wheel (pyproject.toml)


def configs_dir() -> str | None:
    """Directory of the packaged configs: the configs/ of the checkout this dp_jax was imported
    from (so that a checkout runs its own configs, also beside another install), else the
    installed package ``dp_jax_configs``."""
    checkout = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    here = os.path.join(checkout, "configs")
    if os.path.isdir(here) and os.path.isfile(os.path.join(checkout, "pyproject.toml")):
        return here
    try:
        spec = importlib.util.find_spec(PACKAGED_CONFIGS)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        return list(spec.submodule_search_locations)[0]
    return None


def packaged_configs() -> list[str]:
    """Names usable as ``--config=NAME`` (files of the packaged configs, helpers excluded)."""
    d = configs_dir()
    names = sorted(os.listdir(d)) if d else []
    return [n[:-3] for n in names if n.endswith(".py") and not n.startswith("_")]


def resolve_config(spec: str) -> str:
    """``path[:variant]`` unchanged when the path exists, else a packaged config's path.

    Raises FileNotFoundError naming the packaged configs when neither exists.
    """
    path, colon, variant = spec.partition(":")
    if os.path.exists(path):
        return spec
    name = path[:-3] if path.endswith(".py") else path
    if "/" in name or os.sep in name:
        raise FileNotFoundError(f"--config={spec}: no such file {path!r}")
    d = configs_dir()
    candidate = os.path.join(d, name + ".py") if d and not name.startswith("_") else ""
    if os.path.isfile(candidate):
        return candidate + colon + variant
    raise FileNotFoundError(f"--config={spec}: no such file, and no packaged config named "
                            f"{name!r}; packaged: {', '.join(packaged_configs()) or 'none'}")


def load_module(path: str):
    """Import the Python file at ``path`` as a fresh module (not added to ``sys.modules``)."""
    name = "dp_jax_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"config file {path!r} not found or not a Python file")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_config(spec: str):
    """``path[:variant]`` -> ``get_config(variant)``, as ``--config`` reads it.

    A config file that fails (its own ValueError, such as an unknown variant naming the
    allowed ones, or any other error) raises a one-line ValueError naming ``--config``.
    """
    path, _, variant = spec.partition(":")
    try:
        mod = load_module(path)
    except FileNotFoundError:
        raise
    except Exception as e:  # the config file's own bug: one line, not a traceback
        raise ValueError(f"--config={spec}: cannot load {path}: {type(e).__name__}: {e}") from e
    if not callable(getattr(mod, "get_config", None)):
        raise ValueError(f"--config={spec}: {path} defines no get_config(); allowed: a config "
                         "file with get_config(variant='')")
    try:
        return mod.get_config(variant) if variant else mod.get_config()
    except ValueError:
        raise  # the config's message names the variant and the allowed ones
    except Exception as e:
        raise ValueError(f"--config={spec}: get_config({variant!r}) failed: "
                         f"{type(e).__name__}: {e}") from e


def check_override_key(config, dotted: str) -> None:
    """``dotted`` (``"train.lr"``) names a field of ``config``; else a ValueError naming the
    section and listing its valid keys."""
    node, parts = config, dotted.split(".")
    for i, part in enumerate(parts):
        keys = list(node.keys()) if hasattr(node, "keys") else []
        if part not in keys:
            where = ".".join(parts[:i]) or "the config"
            raise ValueError(f"config.{dotted}: {where} has no field {part!r}; valid: "
                             f"{', '.join(sorted(keys)) or 'none (not a section)'}")
        node = node[part]


def apply_overrides(config, overrides: Optional[Mapping[str, Any]]):
    """Set dotted-name fields of ``config`` in place (``{"train.epochs": 2}``), as
    ``--config.train.epochs=2`` does; an unknown field or a value of the wrong type is a
    ValueError naming the field. Returns ``config``."""
    for dotted, value in (overrides or {}).items():
        check_override_key(config, dotted)
        *parents, leaf = dotted.split(".")
        node = config
        for p in parents:
            node = node[p]
        try:
            node[leaf] = value
        except (TypeError, ValueError) as e:
            raise ValueError(f"config.{dotted}={value!r} is invalid: {e}") from None
    return config


def import_plugins(field: str, modules) -> None:
    """Import the comma-separated ``modules`` of config field ``field`` (``"prune.plugins"``):
    they register methods, models or dataset sources. A module that fails to import is a
    ValueError naming the field and the module."""
    for name in [m.strip() for m in str(modules or "").split(",") if m.strip()]:
        try:
            importlib.import_module(name)
        except (Exception, SystemExit) as e:  # a plugin's own error (or exit), in one line
            raise ValueError(f"config.{field}: cannot import {name!r}: "
                             f"{type(e).__name__}: {' '.join(str(e).split())}") from e
