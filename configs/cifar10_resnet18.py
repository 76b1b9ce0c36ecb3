r"""CIFAR-10, ResNet-18 (CIFAR stem): Distilled Pruning vs IMP with rewinding (claims 1 and 4).

  python -m dp_jax.main --config=configs/cifar10_resnet18.py --workdir=runs/c10_r18_w32
  python -m dp_jax.main --config=configs/cifar10_resnet18.py:width=64 --workdir=runs/c10_r18_w64

Five seeds, one job each: python launch/sweep.py --configs configs/cifar10_resnet18.py --seeds 0,1,2,3,4

Default: the half-width IDC ResNet-18 (``width=32``: 32-256 channels, 2.8M params) of the
later paper; ``width=64`` is the standard network (11.2M). Methods: ``dp`` (once the
``dp`` and ``distill`` sections exist), IMP rewound to step 390 (= epoch 1 at batch 128,
lottery-ticket rewinding) and random pruning; 20 rounds of 20% reach 98.8% sparsity.
Real data: SGD lr 0.01, momentum 0.9, wd 5e-4, x0.2 at 2/3 and 5/6 of 160 epochs, batch 128,
random crop + flip (``data.augment``).
The 160 epochs are this config's choice (docs/paper.md gives no epoch count for real data).

Expected compute per seed (``python launch/estimate.py configs/cifar10_resnet18.py[:width=64]``;
model FLOPs from XLA's cost analysis of the training step, 61 full trainings per seed =
dense + 20 rounds x 3 methods; DP's mask search and the distillation are extra and small
next to that):
  width=32: 0.73 GFLOP per training image -> 5.8e15 FLOP per training, 3.6e17 per seed
            = 4.0 A100-hours at an assumed sustained 25 TFLOP/s (f32/TF32, ~16% of peak;
            small convs often reach less: budget 8 h);
  width=64: 2.90 GFLOP per image -> 2.3e16 per training, 1.4e18 per seed = 16 A100-hours.
  Five seeds: ~20-40 (width 32) / ~80 (width 64) A100-hours.

Variants (comma-separated after ':'):
  width=32|64   ResNet base width (default 32).
  seeds=N       seeds seed..seed+N-1 in one process (default 1; sweeps use one job per seed).
  hybrid        add DP-then-IMP (``dp_imp``) when DP is available.
  smoke         tiny run of the same code path (8x8 images, width 4, 1 round) for tests under
                ``tfds.testing.mock_data``.
  paper,set=F   the paper's own path: Distilled Pruning on an imported IDC set F (gradient
                matching, multi-formation factor 2, 10 images/class) with the paper's inner
                recipe -- SGD lr 0.01, momentum 0.9, wd 5e-4, batch 64, 300 epochs over the
                decoded set, lr x0.2 at 2/3 and 5/6, DSA and CutMix (p 0.5, Beta(1, 1)) --
                next to IMP rewound to epoch 1, the random-real-subset control of the set's size
                and random pruning. Import the set first (its preprocessing is checked
                against the experiment's), then run:

    python -m dp_jax.distill.convert --format=idc --data=PATH/TO/IDC/data.pt --factor=2 \
        --lr=0.01 --config=configs/cifar10_resnet18.py --out=sets/idc_cifar10_ipc10.npz
    python -m dp_jax.main --config=configs/cifar10_resnet18.py:paper,set=sets/idc_cifar10_ipc10.npz \
        --workdir=runs/c10_r18_paper
"""

import os

import ml_collections

from dp_jax.config.files import load_module


P = load_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "_paper.py"))
NAMES = ("smoke", "hybrid", "paper")
KEYS = {"width": int, "seeds": int, "set": str}
# The paper's training on a distilled set (IDC's recipe): dp_jax.training.small_set.Recipe fields.
PAPER_INNER = dict(lr=0.01, momentum=0.9, weight_decay=5e-4, batch_size=64, epochs=300,
                   decay_at=(2 / 3, 5 / 6), decay_factor=0.2, cutmix_prob=0.5, cutmix_beta=1.0,
                   augment="dsa")
TRAIN_SIZE = 50_000


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """The config; ``variant`` selects presets (see the module doc)."""
    flags, kv = P.parse_variant(variant, names=NAMES, keys=KEYS, config="configs/cifar10_resnet18.py")
    c = P.load_base()
    P.ensure_fields(c)
    c.task = "prune"
    c.seeds = kv.get("seeds", 1)
    c.data.name = "tfds:cifar10"
    c.data.train_size = 0
    c.data.preprocess = "standard"
    c.data.augment = "crop_flip"
    c.model.name = "resnet18"
    c.model.width = kv.get("width", 32)
    c.model.norm = "batch"
    P.real_data(c, lr=0.01, weight_decay=5e-4, epochs=160, batch_size=128)
    c.train.eval_batch_size = 1000
    rewind = TRAIN_SIZE // c.train.batch_size  # one epoch of steps: lottery-ticket rewinding
    c.prune.rounds = 20
    c.prune.fraction = 0.2
    c.prune.scope = "global"
    c.prune.method = P.methods(c, f"imp:k={rewind},random")
    if "hybrid" in flags:
        c.prune.method += ",dp_imp"
    c.parallel.data_parallel = True  # uses every local device; one device is a 1-device mesh
    P.set_existing(P.section(c, "dp"), dict(P.DP_INNER, batch_size=100))
    P.set_existing(P.section(c, "distill"), dict(ipc=10))
    if "paper" in flags:
        _paper_path(c, kv, rewind)
    if "smoke" in flags:
        c.model.width = 4
        P.smoke(c, image_size=8)
        if "paper" in flags:
            c.prune.method = "dp,subset"
            c.dp.epochs, c.dp.batch_size = 2, 16
    if "paper" in flags:  # dp.epochs sets the paper's inner loop; dp.steps stays at its default
        c.dp.steps = P.load_base().dp.steps
    return c


def _paper_path(c: ml_collections.ConfigDict, kv: dict, rewind: int) -> None:
    """DP on an imported IDC set with the paper's inner recipe (see the module doc)."""
    if not kv.get("set"):
        raise ValueError("variant 'paper' of configs/cifar10_resnet18.py needs set=PATH: a "
                         "distilled.npz imported from an IDC set (python -m "
                         "dp_jax.distill.convert --format=idc ...; see the module doc)")
    c.distill.path = kv["set"]
    P.set_existing(c.dp, PAPER_INNER)
    c.prune.method = f"dp,imp:k={rewind},subset,random"
