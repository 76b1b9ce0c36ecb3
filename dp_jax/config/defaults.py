"""The defaults of every config field, in one place.

``base_config()`` is the default experiment (LeNet-300-100 on Fashion-MNIST; configs/fashion_mnist.py
builds on it) and ``distill_defaults()`` the distillation section at MTT's published values (the
distillation configs build on it). The typed settings (:class:`dp_jax.config.sections.Section`)
take a field missing from a config from ``base_config()``, and so does the run identity's rule
for a field added after a workdir was made.
"""

from __future__ import annotations

import functools

import ml_collections
from ml_collections.config_dict import placeholder


def base_config() -> ml_collections.ConfigDict:
    """Every field of an experiment config, at the default experiment's values."""
    c = ml_collections.ConfigDict()
    c.task = "prune"  # prune | distill | analyze
    c.seed = 0
    c.seeds = 1  # seeds run are seed, seed+1, ..., seed+seeds-1

    c.data = _data()
    c.model = _model()
    c.train = _train()
    c.prune = _prune()
    c.distill = _distill()
    c.dp = _dp()
    c.checkpoint = _checkpoint()
    c.metrics = _metrics()
    c.parallel = _parallel()
    return c


def _data() -> ml_collections.ConfigDict:
    """Where the data comes from and how it is prepared."""
    s = ml_collections.ConfigDict()
    s.name = "fashion_mnist"  # fashion_mnist | tfds:<name> | npz:<path>
    s.data_dir = placeholder(str)
    s.train_size = 0  # 0 = all; otherwise a stratified, seeded subset
    s.preprocess = "standard"  # standard | zca | none
    s.zca_eps = 0.1
    s.image_size = placeholder(int)  # tfds images of varying size: centre crop + resize
    s.augment = "none"  # none | crop_flip | random_resized_crop (stream only)
    s.pipeline = "memory"  # memory (on the devices) | stream (dp_jax.data.pipeline)
    s.classes = ()  # label indices to keep, relabelled 0..k-1 in list order (() = all)
    s.label_cache = placeholder(str)  # stream + classes: where the label index is cached
    s.eval_split = placeholder(str)  # stream: split to test on (default test, else validation)
    s.plugins = ""  # comma-separated modules to import; they register dataset sources
    return s


def _model() -> ml_collections.ConfigDict:
    """The network (a registered model and its architecture fields)."""
    s = ml_collections.ConfigDict()
    s.name = "lenet_300_100"
    s.width = placeholder(int)
    s.depth = placeholder(int)
    s.norm = placeholder(str)
    s.pool = placeholder(str)
    s.width_multiplier = placeholder(float)
    s.plugins = ""  # comma-separated modules to import; they register models
    return s


def _train() -> ml_collections.ConfigDict:
    """Training on real data."""
    # Training on real data: every evaluation of a mask, and IMP's inner loop.
    s = ml_collections.ConfigDict()
    s.epochs = 3
    s.batch_size = 128
    s.optimizer = "sgd"  # sgd | adam | adamw
    s.lr = 0.05
    s.momentum = 0.9
    s.nesterov = False
    s.weight_decay = 5e-4
    s.schedule = "multistep"  # constant | multistep | cosine
    s.decay_at = (2 / 3, 5 / 6)  # fractions of training (multistep)
    s.decay_factor = 0.2
    s.loop = "auto"  # auto | scan | python
    s.unroll = 1
    # float32 | bfloat16: the forward/backward dtype of real-data training, the DP inner loop
    # and MTT's student (weights, masks, optimiser state, loss and metrics stay float32).
    s.compute_dtype = "float32"
    s.eval_batch_size = 2000
    return s


def _prune() -> ml_collections.ConfigDict:
    """The pruning schedule and the methods."""
    s = ml_collections.ConfigDict()
    # Comma-separated methods (docs/methods.md): imp, random, reinit, dp, dp_imp, snip, grasp,
    # synflow, mag_init, subset; options after ':' separated by ';', e.g. 'imp:k=STEP',
    # 'reinit:of=LABEL', 'snip:oneshot', 'synflow:iters=100', 'subset:n=100'.
    s.method = "imp,imp:k=200,random,dp,reinit:of=dp"
    s.rounds = 14
    s.fraction = 0.2  # of the remaining prunable weights, per round
    s.scope = "global"  # global | layerwise
    s.rewind_step = 0  # default k for 'imp' entries (0 = init)
    s.on_empty_layer = "warn"  # warn | error | ignore (only when min_per_layer = 0)
    # Every layer keeps at least this many weights (its best-scoring ones): no layer collapse.
    s.min_per_layer = 1
    # 'LAYER=RATE,...': those layers prune RATE x fraction per round (e.g. 'head=0.5').
    s.layer_rates = ""
    s.score_batches = 1  # snip/grasp: real minibatches (of train.batch_size) per score
    # Rounds to train and test, e.g. '5,6' ('' = all). Every round's mask is still made and
    # saved; a method whose next mask needs the round's training (imp, lrr, dp_imp's IMP
    # rounds) trains and tests every round anyway. Saves the trainings of sparsities nobody
    # reads; a skipped round's mask can be evaluated later (dp-jax eval-mask, export).
    s.evaluate = ""
    s.plugins = ""  # comma-separated modules to import; they register more methods
    return s


def _distill() -> ml_collections.ConfigDict:
    """The distillation section, CPU-sized for LeNet-300-100."""
    # Distillation (MTT) for Distilled Pruning; made in the workdir unless distill.path is set.
    s = distill_defaults()
    # CPU-sized MTT for LeNet-300-100 (docs/distillation.md): 3 experts x 5 epochs on the
    # full training set, 300 iterations matching 2 expert epochs with 20 student steps.
    s.ipc = 10
    s.num_experts = 3
    s.expert_train_epochs = 5
    s.expert_lr = 0.05
    s.expert_batch_size = 128
    s.max_start_epoch = 3
    s.expert_epochs = 2
    s.syn_steps = 20
    s.batch_syn = 100
    s.iterations = 300
    s.lr_img = 100.0
    s.lr_init = 0.05
    s.memory = "unroll"
    s.checkpoint_every = 50
    return s


def _dp() -> ml_collections.ConfigDict:
    """Distilled Pruning's inner loop."""
    # Distilled Pruning's inner loop: training on the distilled set (one compiled program).
    s = ml_collections.ConfigDict()
    s.steps = 300  # optimiser steps per round on the distilled set (when dp.epochs = 0)
    s.epochs = 0  # > 0: epochs over the distilled set instead (the paper's unit)
    s.cutmix_prob = 0.0  # CutMix probability per batch (IDC trains with 0.5); 0 = off
    s.cutmix_beta = 1.0  # Beta(beta, beta) of CutMix's mixing ratio
    s.batch_size = 100  # clipped to the distilled set's size
    s.lr = 0.0  # 0 = the step size learned by distillation (distilled.npz 'lr')
    s.momentum = 0.9
    s.weight_decay = 5e-4
    s.decay_at = (0.5,)  # fractions of the inner loop where lr is multiplied by decay_factor
    s.decay_factor = 0.1
    s.augment = "dsa"  # dsa | none
    s.inner_seeds = 1  # >1: vmapped inner runs, scores = mean |w| over them
    s.loop = "auto"  # scan | python | auto (python for conv nets on CPU)
    s.unroll = 1  # lax.scan unroll of the inner loop
    s.chunk = 0  # >0: chunks of this many unrolled steps (scan over them, or one per call)
    s.switch_sparsity = 0.8  # dp_imp: DP rounds up to this sparsity, IMP after
    s.subset_lr = 0.0  # subset control's step size; 0 = DP's (dp.lr or the learned one)
    return s


def _checkpoint() -> ml_collections.ConfigDict:
    """Which round checkpoints a run keeps."""
    # Round checkpoints (mask + trained weights) kept per run: all (any round can be analysed or
    # exported without retraining; ~0.2 MB per LeNet round) or last (the last two; huge models).
    s = ml_collections.ConfigDict()
    s.keep = "all"
    return s


def _metrics() -> ml_collections.ConfigDict:
    """Where metrics go besides metrics.jsonl."""
    # Where metrics go besides metrics.jsonl (dp_jax/rundir/metrics.py): TensorBoard event files
    # under <workdir>/tb, and optionally Weights & Biases (offline unless WANDB_MODE says so).
    s = ml_collections.ConfigDict()
    s.tensorboard = True
    s.wandb = False
    s.wandb_project = "dp_jax"
    return s


def _parallel() -> ml_collections.ConfigDict:
    """Devices, hosts and vmapped seeds."""
    s = ml_collections.ConfigDict()
    s.data_parallel = False  # shard batches over all devices ('data' mesh axis)
    # seeds > 1: train the seeds as one vmapped program. auto = on for accelerators, off on CPU
    # (no faster for MLPs, 4x slower for conv nets there: docs/performance.md).
    s.vmap_seeds = "auto"  # auto | on | off
    # One process per host, joined by jax.distributed (dp_jax/system/distributed.py documents the
    # coordinator settings; Cloud TPU, SLURM and Open MPI need none).
    s.multihost = False
    s.coordinator_address = placeholder(str)
    s.num_processes = placeholder(int)
    s.process_id = placeholder(int)
    return s


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

    _expert_and_eval_defaults(d)
    return d


def _expert_and_eval_defaults(d: ml_collections.ConfigDict) -> None:
    """The experts' training and the evaluation of a distilled set."""
    # Experts (trained on real data, parameters saved every epoch).
    d.num_experts = 5
    d.expert_train_epochs = 25
    d.expert_lr = 0.01
    d.expert_momentum = 0.0
    d.expert_weight_decay = 0.0
    d.expert_batch_size = 256
    d.expert_augment = "dsa"  # none | dsa | flip_translate
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


@functools.lru_cache(maxsize=None)
def _sections() -> dict:
    return base_config().to_dict()


def section(name: str) -> dict:
    """The defaults of config section ``name`` (``"train"``, ``"prune"``, ...) as a new dict;
    ``""`` gives the top-level scalar fields (task, seed, seeds)."""
    s = _sections()
    if not name:
        return {k: v for k, v in s.items() if not isinstance(v, dict)}
    return dict(s[name])
