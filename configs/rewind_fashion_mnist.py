r"""Where lottery-ticket rewinding is needed, on a CPU budget: the setting search of docs/claims.md.

The question (docs/paper.md, claim 1): does Distilled Pruning *at initialisation* match IMP
*rewound* to an early step k > 0 in a setting where IMP rewound to init (k = 0) fails? That needs
a setting where IMP at k = 0 is clearly below IMP at k > 0 at high sparsity. This config is the
stability setting's data and optimiser (configs/stability_fashion_mnist.py: a stratified
5,000-image Fashion-MNIST subset, SGD momentum 0.9, wd 5e-4, no warm-up, x0.2 at 2/3 and 5/6)
trained five times longer (15 epochs, 585 steps of batch 128), with four rounds of 36 % global
magnitude pruning (1 - 0.64^r: 64.0 % after 2 rounds, 83.2 % after 4).

  # one probe: IMP at k = 0 and rewound to one epoch (k = 39), one seed, ~10-25 min per variant
  python -m dp_jax.main --config=configs/rewind_fashion_mnist.py:VARIANT \
      --workdir=runs/rewind_VARIANT
  # confirm a gap over 3 seeds (finished seeds are kept, new ones added)
  python -m dp_jax.main --config=configs/rewind_fashion_mnist.py:VARIANT \
      --workdir=runs/rewind_VARIANT --config.seeds=3

Variants (``:VARIANT[,VARIANT]``; the probes of docs/claims.md, in the order they were run):
  (none)   ConvNet-16 with BatchNorm (the stability setting's net) at lr 0.5.
  lr02     lr 0.2 instead.
  resnet   ResNet-10 (ResNet-18's CIFAR stem, one basic block per stage), width 8, BatchNorm,
           lr 0.2.
  wide     ConvNet-64 with BatchNorm at lr 0.5.
  full     the whole 60,000-image training set (not the 5,000 subset) for 5 epochs (2,345 steps),
           6 rounds (93.1 %), IMP rewound to k = 100 (4 % of training): on the subset sparsity
           itself helps (IMP at init gains accuracy as it prunes). The setting found: IMP at
           k = 0 falls behind k = 100 from 89.3 % on (docs/claims.md). 70-100 s per training
           on one core (2.8-3.5 min on a slower machine), 7-10 min per seed and method.
  study    with ``full``: every method of the claims study (DP on a set distilled from experts
           trained on a 5,000-image subset; DP then IMP; the random-subset control; SNIP, GraSP,
           SynFlow, random); ~80 min per seed on one core. Seeds can run one workdir each (in
           parallel, one per core) with method subsets, merged by ``dp_jax.reports.pruning``:

             python -m dp_jax.main --config=configs/rewind_fashion_mnist.py:full,study \
                 --workdir=runs/rewind_study_s0 --config.seed=0   # and seeds 1, 2
             python -m dp_jax.report runs/rewind_study_s0 runs/rewind_study_s1 \
                 runs/rewind_study_s2 --out=runs/rewind_study
  controls with ``full,study``: the baselines and sanity checks instead (LRR, ERK random, FORCE,
           DP/IMP/SNIP masks shuffled within layers, GraSP inverted, coreset subsets), trained
           only at 89.3 and 93.1 % (``prune.evaluate``; IMP and LRR train every round):

             python -m dp_jax.main \
                 --config=configs/rewind_fashion_mnist.py:full,study,controls \
                 --workdir=runs/rewind_study_s0 --config.seed=0   # and seeds 1, 2
  smoke    tiny sizes of the same code path, for tests (500 images, 2 epochs, 2 rounds).
"""

import os

import ml_collections

from dp_jax.config.files import load_module


# The reviewers' baselines and sanity checks (docs/claims.md, "DP's tickets under the sanity
# checks"): the sources first (shuffle/invert need their runs in the same workdir).
CONTROLS = ("imp:k=100,lrr,dp,snip:oneshot,grasp:oneshot,random:dist=erk,force,shuffle:of=dp,"
            "shuffle:of=imp_k100,shuffle:of=snip_oneshot,invert:of=grasp_oneshot,subset:n=100,"
            "subset:n=100;select=herding,subset:n=100;select=el2n_easy,"
            "subset:n=100;select=el2n_hard")


def _stability_config() -> ml_collections.ConfigDict:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stability_fashion_mnist.py")
    return load_module(path).get_config()


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """Returns the rewinding-probe config; ``variant`` selects presets (see module doc)."""
    c = _stability_config()
    c.train.epochs = 15            # 5x the stability setting's 3 epochs: near convergence
    c.prune.method = "imp,imp:k=39"
    c.prune.fraction = 0.36
    c.prune.rounds = 4             # 83.2 % sparsity
    for name in [v for v in variant.split(",") if v]:
        _apply_variant(c, name)
    return c


def _apply_variant(c: ml_collections.ConfigDict, name: str) -> None:
    if name == "lr02":
        c.train.lr = 0.2
    elif name == "resnet":
        c.model = ml_collections.ConfigDict(dict(name="resnet18", width=8, norm="batch",
                                                 num_blocks=(1, 1, 1, 1)))
        c.train.lr = 0.2
    elif name == "wide":
        c.model.width = 64
    elif name == "full":
        c.data.train_size = 0
        c.train.epochs = 5
        c.prune.method = "imp,imp:k=100"
        c.prune.rounds = 6
    elif name == "study":
        c.prune.method = ("imp,imp:k=100,dp,dp_imp,subset:n=100,snip:oneshot,grasp:oneshot,"
                          "synflow,random")
        c.distill.expert_train_size = 5000  # experts as cheap as the stability setting's
    elif name == "controls":
        c.prune.method = CONTROLS
        c.prune.evaluate = "5,6"  # 89.3 and 93.1 %: the sparsities the claims are made at
    elif name == "smoke":
        c.data.train_size = 500
        c.train.epochs = 2
        c.train.batch_size = 50
        c.train.eval_batch_size = 500
        c.prune.method = "imp,imp:k=5"
        c.prune.rounds = 2
        c.prune.fraction = 0.5
    else:
        raise ValueError(f"unknown variant {name!r} of configs/rewind_fashion_mnist.py; "
                         "allowed: lr02, resnet, wide, full, study, controls, smoke")
