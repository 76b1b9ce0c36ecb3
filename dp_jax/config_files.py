"""Loading config files by path: ``configs/`` holds files, not a package."""

from __future__ import annotations

import importlib.util
import os


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
    """``path[:variant]`` -> ``get_config(variant)``, as ``--config`` reads it."""
    path, _, variant = spec.partition(":")
    mod = load_module(path)
    return mod.get_config(variant) if variant else mod.get_config()
