r"""Distil Fashion-MNIST to 10 images per class with MTT (or gradient / distribution matching),
on a CPU.

  python -m dp_jax.main --config=configs/distill_fashion_mnist.py --workdir=runs/distill_fmnist
  python -m dp_jax.main --config=configs/distill_fashion_mnist.py:lenet --workdir=runs/distill_lenet

Experts -> MTT -> evaluation (distilled vs a random real subset of 10/class vs full data); see
docs/distillation.md for the measured numbers. Data, model and real-data training sections come
from configs/fashion_mnist.py.

Variants (``--config=configs/distill_fashion_mnist.py:VARIANT[,VARIANT]``):
  (none)  ConvNet-3, width 32, instance norm (the MTT architecture at CPU width), ~20 minutes.
  lenet   LeNet-300-100 (the Distilled Pruning default model), ~10 minutes.
  zca     ZCA whitening instead of per-channel standardisation.
  gm      gradient matching (DC/DSA) instead of MTT, no experts: ~3 minutes of distillation
          with the ConvNet (80 iterations of 2 matches), under 1 s per iteration with ``lenet,gm``.
  dm      distribution matching (DM) instead of MTT, no experts: ~3 minutes (200 iterations)
          with the ConvNet, ~0.1 s per iteration with ``lenet,dm``.
  smoke   tiny sizes of the same code path, for tests (use with data.name='npz:<path>');
          combine as ``smoke,gm`` / ``smoke,dm`` (``smoke`` last keeps its tiny sizes).
"""

import os

import ml_collections

from dp_jax.config.files import load_module
from dp_jax.config.defaults import distill_defaults


def _base_config() -> ml_collections.ConfigDict:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fashion_mnist.py")
    return load_module(path).get_config()


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """Returns the distillation config; ``variant`` selects presets (see module doc)."""
    c = _base_config()
    c.task = "distill"
    del c.prune  # not used by this task
    c.model.name = "convnet"
    c.model.width = 32
    c.model.depth = 3
    c.model.norm = "instance"
    # The full-data baseline trains with c.train (SGD, momentum 0.9, lr 0.01 for the ConvNet).
    c.train.lr = 0.01
    c.train.epochs = 2

    d = distill_defaults()
    d.ipc = 10
    d.num_experts = 3
    d.expert_train_epochs = 4
    d.expert_train_size = 10000   # each expert epoch sees 10k images (1k per class)
    d.expert_lr = 0.1             # CPU budget: faster progress per example than MTT's 0.01
    d.expert_batch_size = 128
    d.max_start_epoch = 2
    d.expert_epochs = 2
    d.syn_steps = 12
    d.batch_syn = 50
    d.iterations = 250
    d.lr_img = 1000.0
    d.lr_lr = 0.002               # on log(step size): keeps it near the experts' (see docs)
    d.lr_init = 0.1               # the experts' step size, as in MTT
    d.memory = "unroll"
    d.checkpoint_every = 50
    d.eval_every = 0
    d.eval_models = 3
    d.eval_epochs = 300
    d.eval_full_epochs = 1
    c.distill = d

    for name in [v for v in variant.split(",") if v]:
        _apply_variant(c, name)
    return c


def _apply_variant(c: ml_collections.ConfigDict, name: str) -> None:
    d = c.distill
    if name == "lenet":
        c.model.name = "lenet_300_100"
        c.model.width = None
        c.model.depth = None
        c.model.norm = None
        c.train.lr = 0.05
        d.expert_train_size = 0       # full 60k epochs: an MLP epoch takes seconds
        d.expert_lr = 0.05
        d.expert_batch_size = 256
        d.lr_init = 0.05
        d.num_experts = 5
        d.expert_train_epochs = 5
        d.max_start_epoch = 4
        d.expert_epochs = 1           # 234 expert steps matched by 30 student steps
        d.syn_steps = 30
        d.batch_syn = 100
        d.iterations = 400
        d.lr_img = 1000.0
        d.lr_lr = 0.01
        d.memory = "unroll"
        d.eval_full_epochs = 3
        d.eval_models = 5
    elif name == "zca":
        c.data.preprocess = "zca"
    elif name == "gm":
        d.method = "gm"
        _gm_dm_cpu(d)
        # ConvNet-32 gradient matching costs ~1.2 s per outer loop of 10 classes on this CPU
        # (DC's ipc-10 setting, 10 x 50 loops, would take ~30 s per iteration).
        d.iterations = 80
        d.gm_outer_loops = 2
        d.gm_inner_loops = 5
        d.gm_batch_real = 64
    elif name == "dm":
        d.method = "dm"
        _gm_dm_cpu(d)
        d.iterations = 200        # ~0.85 s each with ConvNet-32 and 256 real images per class
        d.dm_batch_real = 256
    elif name == "smoke":
        d.gm_outer_loops = 2
        d.gm_inner_loops = 2
        d.gm_batch_real = 8
        d.dm_batch_real = 8
        c.data.train_size = 0
        c.train.batch_size = 20
        c.train.eval_batch_size = 100
        if c.model.name == "convnet":  # smoke after lenet keeps LeNet-300-100
            c.model.width = 4
            c.model.depth = 2
        d.ipc = 2
        d.num_experts = 2
        d.expert_train_epochs = 3
        d.expert_train_size = 0
        d.expert_batch_size = 20
        d.max_start_epoch = 1
        d.expert_epochs = 2
        d.syn_steps = 3
        d.batch_syn = 0
        d.iterations = 4
        d.log_every = 1
        d.checkpoint_every = 2
        d.eval_every = 2
        d.eval_models = 2
        d.eval_epochs = 3
        d.eval_batch_size = 8
        d.eval_full_epochs = 1
    else:
        raise ValueError(f"unknown variant {name!r} of configs/distill_fashion_mnist.py; "
                         "allowed: lenet, zca, smoke, gm, dm")


def _gm_dm_cpu(d: ml_collections.ConfigDict) -> None:
    """Settings gm and dm share: DC's network step size (also the set's evaluation lr)."""
    d.lr_init = 0.01
    d.checkpoint_every = 20
