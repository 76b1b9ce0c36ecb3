"""Optimisers: the real-data optimiser of the ``train`` settings, the one SGD factory every
training uses (real data, the small-set inner loop, distillation), and the schedule position of
a rewound run."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from dp_jax.training.settings import TrainSettings

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "multistep", "cosine")


def sgd(learning_rate, *, momentum: float = 0.0, weight_decay: float = 0.0,
        nesterov: bool = False) -> optax.GradientTransformation:
    """SGD with momentum and coupled L2 weight decay (added to the gradient, as
    ``torch.optim.SGD(weight_decay=...)`` does); ``learning_rate`` is a number, a traced
    scalar or a schedule."""
    tx = optax.sgd(learning_rate, momentum=float(momentum) or None, nesterov=nesterov)
    return optax.chain(optax.add_decayed_weights(float(weight_decay)), tx) \
        if weight_decay else tx


def make_schedule(cfg: TrainSettings, total_steps: int) -> optax.Schedule:
    """Learning-rate schedule from ``cfg`` (lr, schedule, decay_at, decay_factor)."""
    lr = float(cfg.lr)
    kind = cfg.schedule
    if kind == "constant":
        return optax.constant_schedule(lr)
    if kind == "multistep":
        decay_at = tuple(cfg.decay_at or ())
        factor = float(cfg.decay_factor)
        bounds = {int(round(f * total_steps)): factor for f in decay_at}
        return optax.piecewise_constant_schedule(lr, bounds)
    if kind == "cosine":
        return optax.cosine_decay_schedule(lr, max(total_steps, 1))
    raise ValueError(f"train.schedule must be one of {SCHEDULES}, got {kind!r}")


def make_optimizer(cfg: TrainSettings, total_steps: int) -> optax.GradientTransformation:
    """Optimiser from ``cfg``: optimizer, lr, momentum, weight_decay, schedule.

    SGD and Adam use coupled L2 weight decay (added to the gradient, as
    ``torch.optim.SGD(weight_decay=...)`` does); AdamW uses decoupled decay.
    """
    sched = make_schedule(cfg, total_steps)
    name = cfg.optimizer
    wd = float(cfg.weight_decay)
    mom = float(cfg.momentum)
    if name == "sgd":
        return sgd(sched, momentum=mom, weight_decay=wd, nesterov=bool(cfg.nesterov))
    if name == "adam":
        tx = optax.adam(sched)
    elif name == "adamw":
        return optax.adamw(sched, weight_decay=wd)
    else:
        raise ValueError(f"train.optimizer must be one of {OPTIMIZERS}, got {name!r}")
    return optax.chain(optax.add_decayed_weights(wd), tx) if wd else tx


def schedule_at(opt_state, step: int):
    """``opt_state`` with every learning-rate schedule's step count set to ``step`` (the
    schedules of :func:`make_optimizer`; other counts, such as Adam's, are left alone)."""
    is_schedule = lambda s: isinstance(s, optax.ScaleByScheduleState)  # noqa: E731
    return jax.tree.map(
        lambda s: s._replace(count=jnp.asarray(step, s.count.dtype)) if is_schedule(s) else s,
        opt_state, is_leaf=is_schedule)
