r"""Stability at init on a CPU budget: ConvNet-16 (BatchNorm) on 5k Fashion-MNIST images, lr 0.5.

A setting where the *dense* network is unstable at initialisation (error barrier between two SGD
copies > 2 percentage points), to test whether IMP's (k=0) and Distilled Pruning's masks at init are
stable there (docs/paper.md claim 2) and how sharp the trained subnetworks are (claim 3). Results and
the probes that led to this setting: docs/stability.md.

  # pruning: dense, IMP (k=0), random and DP masks, 6 rounds of 30% (88.2% sparsity); the first
  # invocation also distils the 100-image set DP trains on (experts + MTT into the workdir).
  # ~5-10 min per seed on a shared 2-core CPU plus ~3 min of distillation; re-running with more
  # --config.seeds adds seeds (finished seeds are resumed, not recomputed).
  python -m dp_jax.main --config=configs/stability_fashion_mnist.py --workdir=runs/stability \
      --config.seeds=3
  # instability and Hessian of the masks at 0/51/83% sparsity, dense barrier at k = 0 and one
  # epoch (~27-43 min per seed):
  python -m dp_jax.analysis --workdir=runs/stability --analyses=instability,hessian \
      --rounds=0,2,5 --nolayerwise --bn_mode=recompute --k_values=0,39

Setting: MTT ConvNet (3 x [conv3x3 width 16 -> BatchNorm -> ReLU -> avg-pool]) -> dense), a
stratified 5,000-image subset of the training split (standardised with its own statistics), 3
epochs of SGD (batch 128, 117 steps, lr 0.5 from the first step -- no warm-up -- momentum 0.9,
wd 5e-4, x0.2 at 2/3 and 5/6); every mask is evaluated by training it the same way on the subset
and testing on all 10,000 test images. DP: 10 images per class distilled by MTT with experts of
this same architecture trained on the same subset; 300 inner steps per round.

Variants (``--config=configs/stability_fashion_mnist.py:VARIANT[,VARIANT]``):
  probe   round 0 only (dense network, no pruning, no distillation): the cheap probe used to
          search for an unstable setting (~1 min), followed by
          ``python -m dp_jax.analysis --workdir=DIR --rounds=0 --analyses=instability
          --k_values=0 --nolayerwise`` (~3-8 min).
  lr04    lr 0.4 (the borderline setting of the probes).
  smoke   tiny sizes of the same code path (500 images, 2 rounds, 20 MTT iterations), seconds.
"""

import os

import ml_collections

from dp_jax.config.files import load_module


def _base_config() -> ml_collections.ConfigDict:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fashion_mnist.py")
    return load_module(path).get_config()


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """Returns the stability config; ``variant`` selects presets (see module doc)."""
    c = _base_config()
    c.model.name = "convnet"
    c.model.width = 16
    c.model.depth = 3
    c.model.norm = "batch"
    c.model.pool = "avg"
    c.data.train_size = 5000  # stratified subset (seeded by config.seed; shared by all seeds)

    c.train.epochs = 3
    c.train.batch_size = 128
    c.train.optimizer = "sgd"
    c.train.lr = 0.5  # from step 0: no warm-up
    c.train.momentum = 0.9
    c.train.weight_decay = 5e-4
    c.train.schedule = "multistep"
    c.train.decay_at = (2 / 3, 5 / 6)
    c.train.decay_factor = 0.2

    c.prune.method = "imp,random,dp"
    c.prune.fraction = 0.3
    c.prune.rounds = 6  # 1 - 0.7**r: r=2 51.0%, r=5 83.2%, r=6 88.2%
    c.prune.rewind_step = 0

    # MTT sized for a CPU: experts of this architecture on the same 5k subset.
    d = c.distill
    d.ipc = 10
    d.num_experts = 3
    d.expert_train_epochs = 5
    d.expert_train_size = 0  # all of the 5k subset
    d.expert_lr = 0.05
    d.expert_batch_size = 128
    d.max_start_epoch = 3
    d.expert_epochs = 2
    d.syn_steps = 12
    d.batch_syn = 50
    d.iterations = 200
    d.lr_img = 100.0
    d.lr_init = 0.05
    d.memory = "unroll"
    d.checkpoint_every = 50

    c.dp.steps = 300
    c.dp.batch_size = 100
    for name in [v for v in variant.split(",") if v]:
        _apply_variant(c, name)
    return c


def _apply_variant(c: ml_collections.ConfigDict, name: str) -> None:
    if name == "probe":
        c.prune.rounds = 0
        c.prune.method = "imp"
    elif name == "lr04":
        c.train.lr = 0.4
    elif name == "smoke":
        c.data.train_size = 500
        c.train.epochs = 2
        c.train.batch_size = 50
        c.train.eval_batch_size = 500
        c.prune.rounds = 2
        c.prune.fraction = 0.5
        c.distill.num_experts = 2
        c.distill.expert_train_epochs = 3
        c.distill.max_start_epoch = 1
        c.distill.syn_steps = 3
        c.distill.batch_syn = 20
        c.distill.iterations = 20
        c.distill.checkpoint_every = 10
        c.dp.steps = 20
        c.dp.batch_size = 20
    else:
        raise ValueError(f"unknown variant {name!r} of configs/stability_fashion_mnist.py; "
                         "allowed: probe, lr04, smoke")
