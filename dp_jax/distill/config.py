"""Distillation settings: ``distill_defaults()`` (every field, with defaults) and validation.

The pruning config embeds ``distill_defaults()`` as ``config.distill``; the distillation task's
config (``configs/distill_fashion_mnist.py``) does the same. Every check raises ``ValueError``
naming the field and the allowed values, before any work starts.
"""

from __future__ import annotations

import numbers

import ml_collections
import numpy as np
from ml_collections.config_dict import placeholder

from dp_jax.data.augment import AUGMENTATIONS, parse_strategy
from dp_jax.distill.gm import DISTANCES, NET_TRAIN
from dp_jax.distill.mtt import LOOPS, MEMORY_MODES
from dp_jax.distill.synthetic import INITS, check_factor

EVAL_LOOPS = ("auto", "scan", "python")
METHODS = ("mtt", "gm", "dm")


def distill_defaults() -> ml_collections.ConfigDict:
    """Every ``config.distill`` field with its default (MTT's CIFAR-10 10/class values where
    they exist; CPU-sized experts)."""
    d = ml_collections.ConfigDict()
    # mtt: trajectory matching (experts needed); gm: gradient matching (DC/DSA/IDC); dm:
    # distribution matching. gm and dm train no experts (docs/distillation.md).
    d.method = "mtt"
    # Where a distilled set comes from (ensure_distilled): an existing file wins.
    d.path = placeholder(str)        # a distilled.npz to load instead of distilling
    d.buffer_dir = placeholder(str)  # expert buffer directory (default: <workdir>/experts)

    # Synthetic set.
    d.ipc = 10                # stored images per class
    d.factor = 1              # multi-formation: each stored image decodes into factor**2 images
    d.init = "real"           # real | noise
    d.lr_init = 0.01          # MTT: initial learnable step size (the experts' lr); gm/dm: the
                              # set's step size, also gm's network lr (DC's lr_net)

    # MTT.
    d.iterations = 5000
    d.syn_steps = 20          # N: student steps per iteration
    d.expert_epochs = 2       # M: expert epochs to match
    d.max_start_epoch = 20    # start epoch drawn uniformly from [0, max_start_epoch)
    d.batch_syn = 0           # synthetic minibatch size (0 = the whole set)
    d.lr_img = 1000.0         # SGD on the images
    d.momentum_img = 0.5
    d.lr_lr = 0.01            # SGD on the *log* step size (see docs/distillation.md)
    d.momentum_lr = 0.5
    d.dsa = True              # DSA on the student's minibatches
    d.dsa_strategy = "color_crop_cutout_flip_scale_rotate"
    d.dsa_all_ops = False     # False: one random op per call (MTT); True: all ops in order
    d.memory = "remat"        # unroll | remat | constant
    d.loop = "auto"           # auto | scan | python (auto: python for conv nets on CPU)
    d.unroll = 1              # lax.scan unroll of the scan loop
    d.fast_conv = True        # canonical-layout convolutions for second derivatives (CPU)
    d.log_every = 10
    d.checkpoint_every = 200
    d.eval_every = 0          # periodic evaluation during distillation (0 = only at the end)
    d.eval_periodic_models = 1
    _matching_defaults(d)

    # Experts (trained on real data, parameters saved every epoch).
    d.num_experts = 5
    d.expert_train_epochs = 25
    d.expert_lr = 0.01
    d.expert_momentum = 0.0
    d.expert_weight_decay = 0.0
    d.expert_batch_size = 256
    d.expert_augment = "dsa"  # none | dsa | flip_crop
    d.expert_train_size = 0   # 0 = the whole training split; else a stratified subset

    # Evaluation of the distilled set (and of the random-subset / full-data baselines).
    d.eval_models = 5
    d.eval_epochs = 1000
    d.eval_batch_size = 256
    d.eval_augment = "dsa"
    d.eval_momentum = 0.9
    d.eval_weight_decay = 5e-4
    d.eval_loop = "auto"      # auto | scan | python
    d.eval_vmap = False       # vmap the eval networks (scan loop); slower on CPU with DSA
    d.eval_random = True      # also evaluate a random real subset of equal size
    d.eval_full_epochs = 2    # real-data training for the full-data baseline (0 = skip)
    d.eval_full_models = 1
    return d


def _matching_defaults(d: ml_collections.ConfigDict) -> None:
    """The gm and dm fields. Both share with MTT ipc, factor, init, iterations, dsa /
    dsa_strategy / dsa_all_ops (Siamese for gm and dm: one transform per class batch),
    fast_conv and the log/checkpoint/eval cadence; gm trains its networks with lr_init."""
    # Gradient matching (method gm); defaults are DC's (its ipc-10 loops).
    d.gm_distance = "dsa"     # dsa (DC's per-output-node cosine) | mse | l1 (IDC)
    d.gm_outer_loops = 10     # matches (image steps) per fresh network
    d.gm_inner_loops = 50     # network SGD steps between matches
    d.gm_net_train = "syn"    # the network trains on syn (DC) | real (IDC) data
    d.gm_batch_real = 256     # real images per class for each match
    d.gm_batch_net = 256      # minibatch of the network's steps (DC's batch_train)
    d.gm_lr_img = 0.1         # SGD on the images
    d.gm_momentum_img = 0.5
    # Distribution matching (method dm); defaults are DM's.
    d.dm_batch_real = 256     # real images per class per iteration
    d.dm_lr_img = 1.0         # SGD on the images
    d.dm_momentum_img = 0.5


def _need(cond: bool, field: str, allowed: str, value) -> None:
    if not cond:
        raise ValueError(f"config.distill.{field}={value!r} is invalid; allowed: {allowed}")


def _int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _num(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def validate(config) -> None:
    """Static checks of ``config.distill`` (no data needed)."""
    if "distill" not in config:
        raise ValueError("config.distill is missing; start from dp_jax.distill.distill_defaults()")
    d = config.distill
    unknown = sorted(set(d.keys()) - set(distill_defaults().keys()))
    if unknown:
        raise ValueError(f"config.distill has unknown field(s) {unknown}; allowed: "
                         f"{sorted(distill_defaults().keys())}")
    for f in ("ipc", "factor", "iterations", "syn_steps", "expert_epochs", "max_start_epoch",
              "num_experts", "expert_train_epochs", "expert_batch_size", "eval_models",
              "eval_epochs", "eval_batch_size", "log_every", "checkpoint_every", "unroll",
              "eval_periodic_models"):
        lo = 0 if f == "iterations" else 1
        _need(_int(d[f]) and d[f] >= lo, f, f"an integer >= {lo}", d[f])
    _need(d.method in METHODS, "method", " | ".join(METHODS), d.method)
    for f in ("gm_outer_loops", "gm_batch_real", "gm_batch_net", "dm_batch_real"):
        _need(_int(d[f]) and d[f] >= 1, f, "an integer >= 1", d[f])
    _need(_int(d.gm_inner_loops) and d.gm_inner_loops >= 0, "gm_inner_loops",
          "an integer >= 0", d.gm_inner_loops)
    _need(d.gm_distance in DISTANCES, "gm_distance", " | ".join(DISTANCES), d.gm_distance)
    _need(d.gm_net_train in NET_TRAIN, "gm_net_train", " | ".join(NET_TRAIN), d.gm_net_train)
    for f in ("batch_syn", "eval_every", "expert_train_size", "eval_full_epochs",
              "eval_full_models"):
        _need(_int(d[f]) and d[f] >= 0, f, "an integer >= 0", d[f])
    for f in ("lr_img", "lr_init", "expert_lr", "gm_lr_img", "dm_lr_img"):
        _need(_num(d[f]) and d[f] > 0, f, "a number > 0", d[f])
    for f in ("lr_lr", "expert_weight_decay", "eval_weight_decay"):
        _need(_num(d[f]) and d[f] >= 0, f, "a number >= 0", d[f])
    for f in ("momentum_img", "momentum_lr", "expert_momentum", "eval_momentum",
              "gm_momentum_img", "dm_momentum_img"):
        _need(_num(d[f]) and 0 <= d[f] < 1, f, "a number in [0, 1)", d[f])
    for f in ("dsa", "dsa_all_ops", "fast_conv", "eval_vmap", "eval_random"):
        _need(isinstance(d[f], bool), f, "True | False", d[f])
    _need(d.memory in MEMORY_MODES, "memory", " | ".join(MEMORY_MODES), d.memory)
    _need(d.loop in LOOPS, "loop", " | ".join(LOOPS), d.loop)
    _need(d.eval_loop in EVAL_LOOPS, "eval_loop", " | ".join(EVAL_LOOPS), d.eval_loop)
    _need(d.init in INITS, "init", " | ".join(INITS), d.init)
    for f in ("expert_augment", "eval_augment"):
        _need(d[f] in AUGMENTATIONS, f, " | ".join(AUGMENTATIONS), d[f])
    try:
        parse_strategy(d.dsa_strategy)
    except ValueError as e:
        raise ValueError(f"config.distill.dsa_strategy: {e}") from None
    need = d.max_start_epoch + d.expert_epochs
    if d.method == "mtt" and d.expert_train_epochs < need:
        raise ValueError(
            f"config.distill.expert_train_epochs={d.expert_train_epochs} is invalid; allowed: "
            f">= distill.max_start_epoch + distill.expert_epochs = {d.max_start_epoch} + "
            f"{d.expert_epochs} = {need} (the student's target is epoch start + expert_epochs)")


def validate_with_data(config, dataset) -> None:
    """Checks that need the dataset: image divisibility, batch sizes, class counts."""
    d = config.distill
    check_factor(int(d.factor), dataset.image_shape)
    smallest = int(np.bincount(np.asarray(dataset.y_train), minlength=dataset.num_classes).min())
    # Real images initialise the synthetic ones: more per class than a class has would repeat.
    _need(d.ipc <= smallest, "ipc", f"at most the {smallest} images of the smallest class",
          d.ipc)
    n_syn = d.ipc * dataset.num_classes * d.factor ** 2
    _need(d.batch_syn <= n_syn, "batch_syn",
          f"0 (whole set) or at most the {n_syn} synthetic training images", d.batch_syn)
    if d.method != "mtt":  # no experts
        return
    n_exp = d.expert_train_size or len(dataset.y_train)
    _need(d.expert_train_size <= len(dataset.y_train), "expert_train_size",
          f"0 (all) or at most the {len(dataset.y_train)} training examples", d.expert_train_size)
    _need(d.expert_batch_size <= n_exp, "expert_batch_size",
          f"at most the {n_exp} examples the experts train on", d.expert_batch_size)
    if d.expert_train_size:
        _need(d.expert_train_size >= dataset.num_classes, "expert_train_size",
              f"0 or >= num_classes ({dataset.num_classes})", d.expert_train_size)
