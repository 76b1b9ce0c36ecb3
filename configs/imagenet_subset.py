r"""ImageNet subsets: ResNet-10 at 224 px and ConvNet-5 at 128 px (claims 2 and 4).

  python -m dp_jax.main --config=configs/imagenet_subset.py --workdir=runs/inette_r10
  python -m dp_jax.main --config=configs/imagenet_subset.py:model=convnet --workdir=runs/inette_convnet5
  python -m dp_jax.main --config=configs/imagenet_subset.py:imagenet100 --workdir=runs/in100_r10

10 classes: TFDS ``imagenette/320px`` (9,469 train / 3,925 validation images, downloaded by
TFDS), centre-cropped and resized to ``data.image_size`` and held in memory
(224 px: 5.7 GB train + 2.4 GB test as float32, on every device). 100 classes: the
``imagenet2012`` train/validation splits restricted to ``data.classes`` (default: every 10th
of the 1000 label indices, a reproducible choice of this config -- pass a published list
with ``--config.data.classes="(...)"``); ~127k images do not fit in memory, so this variant
streams them (``data.pipeline='stream'``, random-resized-crop) and needs the Trainer
streaming patch of docs/paper_scale.md. ImageNet must be placed in TFDS's manual_dir
first (ILSVRC2012 tar files; TFDS cannot download it).

Recipes (docs/paper.md): SGD momentum 0.9, wd 1e-4, x0.2 at 2/3 and 5/6; lr 0.01 (10 classes),
0.1 (100 classes); 100 epochs (10 classes) / 90 epochs (100 classes) and batch 128 / 256
are this config's choices. Methods: ``dp`` (once the ``dp`` and ``distill`` sections
exist; not for imagenet100, whose streamed data cannot be distilled in memory), IMP
rewound to one epoch, random; 20 rounds (98.8%). ConvNet-5 (MTT's
ImageNet-subset network): width 128, instance norm, 128 px; MTT N=20, M=2 (docs/paper.md), max
start epoch 10, lr_img 1e4 (MTT's table; check).

Expected compute per seed (``python launch/estimate.py configs/imagenet_subset.py[:...]``;
XLA cost analysis: ResNet-10 at 224 px 4.81 GFLOP, ConvNet-5 at 128 px 4.97 GFLOP per
training image; 61 trainings per seed), at an assumed sustained 25 TFLOP/s per A100:
  imagenette, ResNet-10:  4.5e15 FLOP per training, 2.8e17 per seed = 3.2 A100-hours;
  imagenette, ConvNet-5:  4.6e15 per training, 2.9e17 per seed = 3.3 A100-hours
                          (+ MTT experts and distillation);
  imagenet100, ResNet-10: 5.5e16 per training, 3.4e18 per seed = 37 A100-hours; at 25
                          TFLOP/s an A100 takes ~5,200 images/s, i.e. ~12 CPU cores of JPEG
                          decoding + augmentation (~415 images per CPU-second measured).

Variants (comma-separated after ':'):
  imagenette | imagenet100   dataset (default imagenette)
  model=resnet10|convnet     network (default resnet10; convnet = depth 5 at 128 px)
  seeds=N                    seeds in one process (default 1)
  smoke                      tiny run of the same code path (32 px, width 4/8, 1 round)
"""

import os

import ml_collections

from dp_jax.config.files import load_module


P = load_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "_paper.py"))
NAMES = ("smoke", "imagenette", "imagenet100")
KEYS = {"model": str, "seeds": int}
# Training examples, for the rewind step (one epoch). imagenet100 is approximate (~1,270/class).
TRAIN_SIZE = {"imagenette": 9_469, "imagenet100": 126_689}
IMAGENET100_CLASSES = tuple(range(0, 1000, 10))


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """The config; ``variant`` selects presets (see the module doc)."""
    flags, kv = P.parse_variant(variant, names=NAMES, keys=KEYS, config="configs/imagenet_subset.py")
    dataset = "imagenet100" if "imagenet100" in flags else "imagenette"
    model = kv.get("model", "resnet10")
    if model not in ("resnet10", "convnet"):
        raise ValueError(f"configs/imagenet_subset.py: model={model!r} is invalid; allowed: "
                         "resnet10 | convnet")
    c = P.load_base()
    P.ensure_fields(c)
    c.task = "prune"
    c.seeds = kv.get("seeds", 1)
    c.data.train_size = 0
    c.data.preprocess = "standard"  # ZCA is infeasible at 224 px (150k features)
    if model == "resnet10":
        c.model.name = "resnet10"
        c.model.width = 64
        c.model.norm = "batch"
        c.data.image_size = 224
    else:
        c.model.name = "convnet"
        c.model.width = 128
        c.model.depth = 5
        c.model.norm = "instance"
        c.model.pool = "avg"
        c.data.image_size = 128
    if dataset == "imagenette":
        c.data.name = "tfds:imagenette/320px" if model == "resnet10" else "tfds:imagenette/160px"
        c.data.pipeline = "memory"
        c.data.augment = "crop_flip"
        P.real_data(c, lr=0.01, weight_decay=1e-4, epochs=100, batch_size=128)
    else:
        c.data.name = "tfds:imagenet2012"
        c.data.pipeline = "stream"
        c.data.augment = "random_resized_crop"
        c.data.classes = IMAGENET100_CLASSES
        c.data.eval_split = "validation"  # ImageNet's 'test' split carries no labels
        P.real_data(c, lr=0.1, weight_decay=1e-4, epochs=90, batch_size=256)
    c.train.eval_batch_size = 500
    rewind = TRAIN_SIZE[dataset] // c.train.batch_size
    c.prune.rounds = 20
    c.prune.fraction = 0.2
    baselines = f"imp:k={rewind},random"
    # DP distils from an in-memory training set; a streamed ImageNet-100 has none (yet).
    c.prune.method = baselines if dataset == "imagenet100" else P.methods(c, baselines)
    c.parallel.data_parallel = True
    num_classes = 10 if dataset == "imagenette" else 100
    P.set_existing(P.section(c, "dp"), dict(P.DP_INNER, batch_size=min(256, 10 * num_classes)))
    P.set_existing(P.section(c, "distill"), dict(
        ipc=10, syn_steps=20, expert_epochs=2, max_start_epoch=10, lr_img=1e4, lr_init=0.01,
        iterations=5000, num_experts=10, expert_train_epochs=50, expert_lr=0.01,
        expert_batch_size=256))
    if "smoke" in flags:
        c.model.width = 4 if model == "resnet10" else 8
        P.smoke(c, image_size=32)
        if dataset == "imagenet100":
            # Mock labels spread over 1000 classes: half of them keeps ~half of the examples.
            c.data.classes = tuple(range(500))
            c.train.batch_size = 8
            c.prune.method = "imp:k=1"  # no DP on a stream (see above)
    return c
