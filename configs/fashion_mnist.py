r"""The CPU default experiment: lottery tickets for LeNet-300-100 on Fashion-MNIST.

  python -m dp_jax.main --config=configs/fashion_mnist.py --workdir=runs/fmnist

IMP rewound to init (k=0) and to an early step (k>0) and random pruning, 20% of
the remaining weights per round for 14 rounds (95.6% sparsity), all evaluated by
training the masked network on the full real training set. About 10 minutes on a
2-core CPU.

Variants (``--config=configs/fashion_mnist.py:VARIANT``):
  smoke   tiny run of the same code path (a few hundred examples, 2 rounds), for tests.
  conv    a small ConvNet (width 32) on a 10k-example subset.
  converged
          the claims study's contrast setting (docs/claims.md): every training 10 epochs (dense
          89.6 % over 3 seeds; one 20-epoch run 90.1 %), 7 rounds of 36 % (95.6 %), and every
          method of the study, one seed per workdir (~25 min per seed on one core;
          merge the seeds with ``python -m dp_jax.report W0 W1 W2 --out=W``):

            python -m dp_jax.main --config=configs/fashion_mnist.py:converged \
                --workdir=runs/lenet_converged_s0 --config.seed=0
"""

import ml_collections

from dp_jax.config import defaults


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """Returns the experiment config; ``variant`` selects a preset (see module doc)."""
    c = defaults.base_config()
    if variant:
        _apply_variant(c, variant)
    return c


def _apply_variant(c: ml_collections.ConfigDict, variant: str) -> None:
    for name in variant.split(","):
        if name == "smoke":
            c.data.train_size = 500
            c.train.epochs = 2
            c.train.batch_size = 50
            c.train.eval_batch_size = 500
            c.prune.rounds = 2
            c.prune.fraction = 0.5
            c.prune.method = "imp,imp:k=5,random"
        elif name == "converged":
            c.train.epochs = 10
            c.prune.rounds = 7
            c.prune.fraction = 0.36
            c.prune.method = ("imp,imp:k=200,dp,dp_imp,subset:n=100,snip:oneshot,grasp:oneshot,"
                              "synflow,random")
        elif name == "conv":
            c.model.name = "convnet"
            c.model.width = 32
            c.model.depth = 3
            c.data.train_size = 10000
            c.train.lr = 0.01
        else:
            raise ValueError(f"unknown variant {name!r} of configs/fashion_mnist.py; "
                             "allowed: smoke, conv, converged")
