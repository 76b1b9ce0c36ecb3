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
from ml_collections.config_dict import placeholder

from dp_jax.distill import distill_defaults


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """Returns the experiment config; ``variant`` selects a preset (see module doc)."""
    c = ml_collections.ConfigDict()
    c.task = "prune"  # prune | distill | analyze
    c.seed = 0
    c.seeds = 1  # seeds run are seed, seed+1, ..., seed+seeds-1

    c.data = ml_collections.ConfigDict()
    c.data.name = "fashion_mnist"  # fashion_mnist | tfds:<name> | npz:<path>
    c.data.data_dir = placeholder(str)
    c.data.train_size = 0  # 0 = all; otherwise a stratified, seeded subset
    c.data.preprocess = "standard"  # standard | zca | none
    c.data.zca_eps = 0.1
    c.data.image_size = placeholder(int)  # tfds images of varying size: centre crop + resize
    c.data.augment = "none"  # none | crop_flip | random_resized_crop (stream only)
    c.data.pipeline = "memory"  # memory (on the devices) | stream (dp_jax.data.pipeline)
    c.data.classes = ()  # stream: label indices to keep, relabelled 0..k-1 (() = all)
    c.data.label_cache = placeholder(str)  # stream + classes: where the label index is cached
    c.data.eval_split = placeholder(str)  # stream: split to test on (default test, else validation)

    c.model = ml_collections.ConfigDict()
    c.model.name = "lenet_300_100"
    c.model.width = placeholder(int)
    c.model.depth = placeholder(int)
    c.model.norm = placeholder(str)
    c.model.pool = placeholder(str)
    c.model.width_multiplier = placeholder(float)

    # Training on real data: every evaluation of a mask, and IMP's inner loop.
    c.train = ml_collections.ConfigDict()
    c.train.epochs = 3
    c.train.batch_size = 128
    c.train.optimizer = "sgd"  # sgd | adam | adamw
    c.train.lr = 0.05
    c.train.momentum = 0.9
    c.train.nesterov = False
    c.train.weight_decay = 5e-4
    c.train.schedule = "multistep"  # constant | multistep | cosine
    c.train.decay_at = (2 / 3, 5 / 6)  # fractions of training (multistep)
    c.train.decay_factor = 0.2
    c.train.loop = "auto"  # auto | scan | python
    c.train.unroll = 1
    # float32 | bfloat16: the forward/backward dtype of real-data training, the DP inner loop
    # and MTT's student (weights, masks, optimiser state, loss and metrics stay float32).
    c.train.compute_dtype = "float32"
    c.train.eval_batch_size = 2000

    c.prune = ml_collections.ConfigDict()
    # Comma-separated methods (docs/methods.md): imp, random, reinit, dp, dp_imp, snip, grasp,
    # synflow, mag_init, subset; options after ':' separated by ';', e.g. 'imp:k=STEP',
    # 'reinit:of=LABEL', 'snip:oneshot', 'synflow:iters=100', 'subset:n=100'.
    c.prune.method = "imp,imp:k=200,random,dp,reinit:of=dp"
    c.prune.rounds = 14
    c.prune.fraction = 0.2  # of the remaining prunable weights, per round
    c.prune.scope = "global"  # global | layerwise
    c.prune.rewind_step = 0  # default k for 'imp' entries (0 = init)
    c.prune.on_empty_layer = "warn"  # warn | error | ignore (only when min_per_layer = 0)
    # Every layer keeps at least this many weights (its best-scoring ones): no layer collapse.
    c.prune.min_per_layer = 1
    # 'LAYER=RATE,...': those layers prune RATE x fraction per round (e.g. 'head=0.5').
    c.prune.layer_rates = ""
    c.prune.score_batches = 1  # snip/grasp: real minibatches (of train.batch_size) per score
    c.prune.plugins = ""  # comma-separated modules to import; they register more methods

    # Distillation (MTT) for Distilled Pruning; made in the workdir unless distill.path is set.
    c.distill = distill_defaults()
    # CPU-sized MTT for LeNet-300-100 (docs/distillation.md): 3 experts x 5 epochs on the
    # full training set, 300 iterations matching 2 expert epochs with 20 student steps.
    c.distill.ipc = 10
    c.distill.num_experts = 3
    c.distill.expert_train_epochs = 5
    c.distill.expert_lr = 0.05
    c.distill.expert_batch_size = 128
    c.distill.max_start_epoch = 3
    c.distill.expert_epochs = 2
    c.distill.syn_steps = 20
    c.distill.batch_syn = 100
    c.distill.iterations = 300
    c.distill.lr_img = 100.0
    c.distill.lr_init = 0.05
    c.distill.memory = "unroll"
    c.distill.checkpoint_every = 50

    # Distilled Pruning's inner loop: training on the distilled set (one compiled program).
    c.dp = ml_collections.ConfigDict()
    c.dp.steps = 300  # optimiser steps per round on the distilled set (when dp.epochs = 0)
    c.dp.epochs = 0  # > 0: epochs over the distilled set instead (the paper's unit)
    c.dp.cutmix_prob = 0.0  # CutMix probability per batch (IDC trains with 0.5); 0 = off
    c.dp.cutmix_beta = 1.0  # Beta(beta, beta) of CutMix's mixing ratio
    c.dp.batch_size = 100  # clipped to the distilled set's size
    c.dp.lr = 0.0  # 0 = the step size learned by distillation (distilled.npz 'lr')
    c.dp.momentum = 0.9
    c.dp.weight_decay = 5e-4
    c.dp.decay_at = (0.5,)  # fractions of the inner loop where lr is multiplied by decay_factor
    c.dp.decay_factor = 0.1
    c.dp.augment = "dsa"  # dsa | none
    c.dp.inner_seeds = 1  # >1: vmapped inner runs, scores = mean |w| over them
    c.dp.loop = "auto"  # scan | python | auto (python for conv nets on CPU)
    c.dp.unroll = 1  # lax.scan unroll of the inner loop
    c.dp.chunk = 0  # >0: chunks of this many unrolled steps (scan over them, or one per call)
    c.dp.switch_sparsity = 0.8  # dp_imp: DP rounds up to this sparsity, IMP after
    c.dp.subset_lr = 0.0  # subset control's step size; 0 = DP's (dp.lr or the learned one)

    # Round checkpoints (mask + trained weights) kept per run: all (any round can be analysed or
    # exported without retraining; ~0.2 MB per LeNet round) or last (the last two; huge models).
    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.keep = "all"

    # Where metrics go besides metrics.jsonl (dp_jax/rundir/metrics.py): TensorBoard event files
    # under <workdir>/tb, and optionally Weights & Biases (offline unless WANDB_MODE says so).
    c.metrics = ml_collections.ConfigDict()
    c.metrics.tensorboard = True
    c.metrics.wandb = False
    c.metrics.wandb_project = "dp_jax"

    c.parallel = ml_collections.ConfigDict()
    c.parallel.data_parallel = False  # shard batches over all devices ('data' mesh axis)
    # seeds > 1: train the seeds as one vmapped program. auto = on for accelerators, off on CPU
    # (no faster for MLPs, 4x slower for conv nets there: docs/performance.md).
    c.parallel.vmap_seeds = "auto"  # auto | on | off
    # One process per host, joined by jax.distributed (dp_jax/system/distributed.py documents the
    # coordinator settings; Cloud TPU, SLURM and Open MPI need none).
    c.parallel.multihost = False
    c.parallel.coordinator_address = placeholder(str)
    c.parallel.num_processes = placeholder(int)
    c.parallel.process_id = placeholder(int)

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
