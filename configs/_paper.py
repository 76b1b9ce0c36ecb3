"""Shared pieces of the paper-scale configs (not a config itself: it has no get_config).

Every paper config starts from ``configs/fashion_mnist.py``'s ``get_config()`` so
that sections other modules add to the base (``distill``, ``dp``, ...) are
inherited; fields of those sections are set only where they already exist
(:func:`set_existing`), so a config keeps loading while the sections evolve.
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections
from ml_collections.config_dict import placeholder

from dp_jax.config.files import load_module

_HERE = os.path.dirname(os.path.abspath(__file__))

# Real-data recipe of docs/paper.md (SGD, momentum 0.9, step decay x0.2 at 2/3 and 5/6 of training).
REAL_DATA = dict(optimizer="sgd", momentum=0.9, nesterov=False, schedule="multistep",
                 decay_at=(2 / 3, 5 / 6), decay_factor=0.2)

# Training on a distilled set (docs/paper.md "Architectures and recipes"); field names of
# dp_jax.training.small_set.Recipe. lr=0 means "the step size learned by distillation".
DP_INNER = dict(lr=0.0, momentum=0.9, weight_decay=5e-4, decay_at=(2 / 3, 5 / 6),
                decay_factor=0.2, steps=1000)


def load_base(variant: str = "") -> ml_collections.ConfigDict:
    """``configs/fashion_mnist.py``'s ``get_config(variant)``, imported by file path."""
    return load_module(os.path.join(_HERE, "fashion_mnist.py")).get_config(variant)


def ensure_fields(c: ml_collections.ConfigDict) -> None:
    """Add the fields paper configs use that the base config may not define yet.

    ``data.augment`` and ``data.pipeline`` take effect once the experiment reads them
    (docs/paper_scale.md lists the patch); until then the in-memory path runs without
    augmentation.
    """
    extra = {
        "data": dict(image_size=placeholder(int), augment="none", pipeline="memory",
                     classes=(), label_cache=placeholder(str), eval_split=placeholder(str)),
        "parallel": dict(multihost=False, coordinator_address=placeholder(str),
                         num_processes=placeholder(int), process_id=placeholder(int),
                         vmap_seeds="auto"),
    }
    for section, fields in extra.items():
        for name, value in fields.items():
            if name not in c[section]:
                c[section][name] = value


def set_existing(section: Any, values: dict) -> list[str]:
    """Set each ``values`` field that ``section`` already has; returns the names skipped.

    A missing section (None) skips everything. Types follow the existing field where
    it is typed (ints stay ints), so ConfigDict's type checks do not trip.
    """
    if section is None:
        return sorted(values)
    skipped = []
    for name, value in values.items():
        if name in section:
            current = section[name]
            is_int = isinstance(current, int) and not isinstance(current, bool)
            if is_int and isinstance(value, float) and value.is_integer():
                value = int(value)
            section[name] = value
        else:
            skipped.append(name)
    return skipped


def section(c: ml_collections.ConfigDict, name: str):
    """``c[name]`` if the section exists, else None."""
    return c[name] if name in c else None


def methods(c: ml_collections.ConfigDict, baselines: str) -> str:
    """``prune.method``: Distilled Pruning next to ``baselines``."""
    return f"dp,{baselines}"


def real_data(c: ml_collections.ConfigDict, *, lr: float, weight_decay: float, epochs: int,
              batch_size: int) -> None:
    """Apply the paper's real-data training recipe."""
    for k, v in REAL_DATA.items():
        c.train[k] = v
    c.train.lr, c.train.weight_decay = lr, weight_decay
    c.train.epochs, c.train.batch_size = epochs, batch_size


def parse_variant(variant: str, *, names: tuple, keys: dict, config: str) -> tuple[list, dict]:
    """Split ``'smoke,width=64'`` into names and typed key=value pairs; ValueError otherwise.

    Args:
      variant: the string after ':' in ``--config=FILE:VARIANT``.
      names: allowed bare names.
      keys: allowed keys -> type (int, str, float).
      config: the config file, for messages.
    """
    flags, kv = [], {}
    for token in [t.strip() for t in (variant or "").split(",") if t.strip()]:
        if "=" in token:
            k, _, v = token.partition("=")
            if k not in keys:
                raise ValueError(f"unknown variant key {k!r} of {config}; allowed: "
                                 + ", ".join(f"{n}=..." for n in keys))
            try:
                kv[k] = keys[k](v)
            except ValueError:
                raise ValueError(f"variant {token!r} of {config}: {k} must be "
                                 f"{keys[k].__name__}") from None
        elif token in names:
            flags.append(token)
        else:
            raise ValueError(f"unknown variant {token!r} of {config}; allowed: "
                             + ", ".join(list(names) + [f"{n}=..." for n in keys]))
    return flags, kv


def smoke(c: ml_collections.ConfigDict, *, image_size: int, batch_size: int = 16) -> None:
    """Shrink to seconds on CPU with the same code path (run under ``tfds.testing.mock_data``).

    ``data.name`` stays the real dataset: the tests mock it; override it
    (``--config.data.name=npz:...``) to smoke-test elsewhere.
    """
    c.data.image_size = image_size
    c.data.train_size = 0
    c.train.epochs = 1
    c.train.batch_size = batch_size
    c.train.eval_batch_size = 64
    c.prune.rounds = 1
    c.prune.fraction = 0.5
    # Random pruning is left out: masks.random_scores compiles one program per leaf shape,
    # ~10 s of a smoke run on a shared CPU; the full configs keep it.
    c.prune.method = methods(c, "imp:k=1")
    set_existing(section(c, "dp"), dict(steps=4, batch_size=batch_size))
    set_existing(section(c, "distill"), dict(
        ipc=1, iterations=2, num_experts=1, expert_train_epochs=2, expert_epochs=1,
        max_start_epoch=1, syn_steps=2, batch_syn=0, expert_batch_size=batch_size,
        eval_models=1, eval_epochs=2, eval_batch_size=batch_size, eval_full_epochs=0,
        eval_random=False, log_every=1, checkpoint_every=1))
