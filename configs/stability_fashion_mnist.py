r"""Stability at init on a CPU budget: a small ConvNet on a Fashion-MNIST subset, high lr, no warm-up.

Filled in below once the probes are done (see docs/stability.md).
"""

import importlib.util
import os

import ml_collections


def _base_config() -> ml_collections.ConfigDict:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fashion_mnist.py")
    spec = importlib.util.spec_from_file_location("_dp_jax_fashion_mnist_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """Returns the stability config; ``variant`` selects presets (see module doc)."""
    c = _base_config()
    c.model.name = "convnet"
    c.model.width = 16
    c.model.depth = 3
    c.model.norm = "batch"
    c.model.pool = "avg"
    c.data.train_size = 5000
    c.train.epochs = 3
    c.train.batch_size = 128
    c.train.optimizer = "sgd"
    c.train.lr = 0.1
    c.train.momentum = 0.9
    c.train.weight_decay = 5e-4
    c.train.schedule = "multistep"
    c.prune.method = "imp,random"
    c.prune.fraction = 0.2
    c.prune.rounds = 11
    c.prune.rewind_step = 0
    for name in [v for v in variant.split(",") if v]:
        _apply_variant(c, name)
    return c


def _apply_variant(c: ml_collections.ConfigDict, name: str) -> None:
    if name == "probe":
        c.prune.rounds = 0
        c.prune.method = "imp"
    else:
        raise ValueError(f"unknown variant {name!r} of configs/stability_fashion_mnist.py; "
                         "allowed: probe")
