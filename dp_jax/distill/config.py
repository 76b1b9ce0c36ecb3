"""Validation of the distillation settings (the defaults are dp_jax.config.defaults.distill_defaults).

The pruning config embeds ``distill_defaults()`` as ``config.distill``; the distillation task's
config (``configs/distill_fashion_mnist.py``) does the same. Every check raises ``ValueError``
naming the field and the allowed values, before any work starts.
"""

from __future__ import annotations

import numbers

import numpy as np

from dp_jax.data.augment import ALIASES, AUGMENTATIONS, parse_strategy
from dp_jax.distill.gm import DISTANCES, NET_TRAIN
from dp_jax.distill.mtt import LOOPS, MEMORY_MODES
from dp_jax.distill import registry
from dp_jax.distill.settings import DistillSettings
from dp_jax.distill.synthetic import INITS, check_factor

EVAL_LOOPS = ("auto", "scan", "python")


def _need(cond: bool, field: str, allowed: str, value) -> None:
    if not cond:
        raise ValueError(f"config.distill.{field}={value!r} is invalid; allowed: {allowed}")


def _int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _num(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def validate(d: DistillSettings) -> None:
    """Static checks of the distillation settings (no data needed)."""
    for f in ("ipc", "factor", "iterations", "syn_steps", "expert_epochs", "max_start_epoch",
              "num_experts", "expert_train_epochs", "expert_batch_size", "eval_models",
              "eval_epochs", "eval_batch_size", "log_every", "checkpoint_every", "unroll",
              "eval_periodic_models"):
        lo = 0 if f == "iterations" else 1
        _need(_int(getattr(d, f)) and getattr(d, f) >= lo, f, f"an integer >= {lo}", getattr(d, f))
    distiller = registry.get(d.method)  # a ValueError names the allowed ones
    for f in ("gm_outer_loops", "gm_batch_real", "gm_batch_net", "dm_batch_real"):
        _need(_int(getattr(d, f)) and getattr(d, f) >= 1, f, "an integer >= 1", getattr(d, f))
    _need(_int(d.gm_inner_loops) and d.gm_inner_loops >= 0, "gm_inner_loops",
          "an integer >= 0", d.gm_inner_loops)
    _need(d.gm_distance in DISTANCES, "gm_distance", " | ".join(DISTANCES), d.gm_distance)
    _need(d.gm_net_train in NET_TRAIN, "gm_net_train", " | ".join(NET_TRAIN), d.gm_net_train)
    for f in ("batch_syn", "eval_every", "expert_train_size", "eval_full_epochs",
              "eval_full_models"):
        _need(_int(getattr(d, f)) and getattr(d, f) >= 0, f, "an integer >= 0", getattr(d, f))
    for f in ("lr_img", "lr_init", "expert_lr", "gm_lr_img", "dm_lr_img"):
        _need(_num(getattr(d, f)) and getattr(d, f) > 0, f, "a number > 0", getattr(d, f))
    for f in ("lr_lr", "expert_weight_decay", "eval_weight_decay"):
        _need(_num(getattr(d, f)) and getattr(d, f) >= 0, f, "a number >= 0", getattr(d, f))
    for f in ("momentum_img", "momentum_lr", "expert_momentum", "eval_momentum",
              "gm_momentum_img", "dm_momentum_img"):
        _need(_num(getattr(d, f)) and 0 <= getattr(d, f) < 1, f, "a number in [0, 1)", getattr(d, f))
    for f in ("dsa", "dsa_all_ops", "fast_conv", "eval_vmap", "eval_random"):
        _need(isinstance(getattr(d, f), bool), f, "True | False", getattr(d, f))
    _need(d.memory in MEMORY_MODES, "memory", " | ".join(MEMORY_MODES), d.memory)
    _need(d.loop in LOOPS, "loop", " | ".join(LOOPS), d.loop)
    _need(d.eval_loop in EVAL_LOOPS, "eval_loop", " | ".join(EVAL_LOOPS), d.eval_loop)
    _need(d.init in INITS, "init", " | ".join(INITS), d.init)
    for f in ("expert_augment", "eval_augment"):
        _need(getattr(d, f) in AUGMENTATIONS + tuple(ALIASES), f, " | ".join(AUGMENTATIONS),
              getattr(d, f))
    try:
        parse_strategy(d.dsa_strategy)
    except ValueError as e:
        raise ValueError(f"config.distill.dsa_strategy: {e}") from None
    need = d.max_start_epoch + d.expert_epochs
    if distiller.needs_experts and d.expert_train_epochs < need:
        raise ValueError(
            f"config.distill.expert_train_epochs={d.expert_train_epochs} is invalid; allowed: "
            f">= distill.max_start_epoch + distill.expert_epochs = {d.max_start_epoch} + "
            f"{d.expert_epochs} = {need} (the student's target is epoch start + expert_epochs)")


def validate_with_data(d: DistillSettings, dataset) -> None:
    """Checks that need the dataset: image divisibility, batch sizes, class counts."""
    check_factor(int(d.factor), dataset.image_shape)
    smallest = int(np.bincount(np.asarray(dataset.y_train), minlength=dataset.num_classes).min())
    # Real images initialise the synthetic ones: more per class than a class has would repeat.
    _need(d.ipc <= smallest, "ipc", f"at most the {smallest} images of the smallest class",
          d.ipc)
    n_syn = d.ipc * dataset.num_classes * d.factor ** 2
    _need(d.batch_syn <= n_syn, "batch_syn",
          f"0 (whole set) or at most the {n_syn} synthetic training images", d.batch_syn)
    if not registry.get(d.method).needs_experts:
        return
    n_exp = d.expert_train_size or len(dataset.y_train)
    _need(d.expert_train_size <= len(dataset.y_train), "expert_train_size",
          f"0 (all) or at most the {len(dataset.y_train)} training examples", d.expert_train_size)
    _need(d.expert_batch_size <= n_exp, "expert_batch_size",
          f"at most the {n_exp} examples the experts train on", d.expert_batch_size)
    if d.expert_train_size:
        _need(d.expert_train_size >= dataset.num_classes, "expert_train_size",
              f"0 or >= num_classes ({dataset.num_classes})", d.expert_train_size)
