"""Tiny trainings whose results must be bit-identical when recomputed
(tests/training/test_determinism.py).

``BUILDERS[case]()`` builds a case's jitted programs and returns ``run()``, which computes the
case from its initial values and returns a pytree of results:

  convnet_batch, convnet_instance  8 Trainer steps of the ConvNet (BatchNorm / instance norm)
  mtt                              one MTT iteration: matching loss, gradients, updated images
  dp_inner                         DP's inner loop (scan form, two inner seeds)

Run as a script it prints JSON ``{case: sha256}`` (:func:`digest`) for the cases named on the
command line (all by default). It sets no XLA flag: it checks what a user's process computes,
so a variant is probed by setting XLA_FLAGS in the environment, e.g.
``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= python tests/scripts/determinism_probe.py``.
"""

import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from dp_jax import masks  # noqa: E402
from dp_jax.data.augment import make_augment  # noqa: E402
from dp_jax.distill import common as distill_common, mtt  # noqa: E402
from dp_jax.models import create_model, init_variables  # noqa: E402
from dp_jax.training import small_set, trainer as train  # noqa: E402
from dp_jax.training.settings import TrainSettings  # noqa: E402

try:  # the real-data optimiser's home (it moved from trainer.py to optimizers.py)
    from dp_jax.training.optimizers import make_optimizer  # noqa: E402
except ImportError:  # pragma: no cover
    make_optimizer = train.make_optimizer

SHAPE = (8, 8, 1)
CLASSES = 10


def convnet(norm: str):
    """The width-8, depth-2 ConvNet with ``norm`` ('batch' or 'instance'), 10 classes."""
    return create_model(ml_collections.ConfigDict(
        {"name": "convnet", "width": 8, "depth": 2, "norm": norm}), num_classes=CLASSES)


def data(n: int, seed: int = 0):
    """``n`` random 8x8x1 images with labels ``i mod 10``."""
    x = jax.random.normal(jax.random.key(seed), (n,) + SHAPE)
    return x, jnp.arange(n) % CLASSES


def build_convnet(norm: str, num_steps: int = 8):
    """``run()`` -> state after ``num_steps`` masked SGD steps (batch 16 of 64: two epochs)."""
    model = convnet(norm)
    cfg = TrainSettings.from_config(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4,
                                    schedule="constant")
    tx = make_optimizer(cfg, num_steps)
    x, y = data(64)
    like = jax.eval_shape(lambda: init_variables(model, jax.random.key(1), SHAPE))["params"]
    tr = train.Trainer(model, tx, batch_size=16, num_train=64,
                       loop=train.resolve_loop("auto", like, model, SHAPE))

    def run():
        v = init_variables(model, jax.random.key(1), SHAPE)
        mask = masks.prune(masks.magnitude_scores(v["params"]), masks.ones_like(v["params"]), 0.5)
        state, _ = tr.train(train.create_state(v, mask, tx), x, y, jax.random.key(2), num_steps)
        return {"params": state.params, "batch_stats": state.batch_stats,
                "opt_state": state.opt_state}
    return run


def build_mtt():
    """``run()`` -> one MTT iteration on 20 synthetic images (DSA, 4 student steps, the
    defaults' memory and loop): loss, gradients and the updated images and log step size."""
    model = convnet("instance")
    p0 = init_variables(model, jax.random.key(1), SHAPE)["params"]
    leaves_, tree = jax.tree.flatten(p0)
    keys = jax.random.split(jax.random.key(3), len(leaves_))
    p1 = jax.tree.unflatten(tree, [a + 0.05 * jax.random.normal(k, a.shape)
                                   for a, k in zip(leaves_, keys)])
    images, labels = data(20, seed=4)
    matcher = mtt.TrajectoryMatcher(
        model, num_steps=4, batch_size=10, memory="remat", augment=make_augment("dsa"),
        loop=mtt.resolve_loop("auto", p0))
    tx_img, tx_lr = distill_common.sgd(100.0, 0.5), distill_common.sgd(0.01, 0.5)

    def run():
        log_lr = jnp.log(jnp.float32(0.01))
        loss, gx, glr = matcher(images, labels, log_lr, p0, p1, masks.ones_like(p0),
                                jax.random.key(5))
        new_images, new_log_lr, _, _ = mtt.apply_updates(
            images, log_lr, tx_img.init(images), tx_lr.init(log_lr), gx, glr,
            tx_img=tx_img, tx_lr=tx_lr)
        return {"loss": loss, "grad_images": gx, "grad_log_lr": glr, "images": new_images,
                "log_lr": new_log_lr}
    return run


def build_dp_inner():
    """``run()`` -> params and final losses of DP's inner loop: 8 steps (batch 16 of 32, DSA,
    lr decay at half) of the BatchNorm ConvNet, two inner seeds, scan form."""
    model = convnet("batch")
    x, y = data(32, seed=6)
    recipe = small_set.Recipe(lr=0.05, steps=8, batch_size=16, decay_at=(0.5,))
    fn = small_set.make_inner_train(model, recipe, 32, make_augment("dsa"), loop="scan")

    def run():
        v = init_variables(model, jax.random.key(1), SHAPE)
        mask = masks.prune(masks.magnitude_scores(v["params"]), masks.ones_like(v["params"]), 0.5)
        params, loss = fn(v, mask, x, y, jax.random.split(jax.random.key(7), 2))
        return {"params": params, "final_loss": loss}
    return run


BUILDERS = {
    "convnet_batch": lambda: build_convnet("batch"),
    "convnet_instance": lambda: build_convnet("instance"),
    "mtt": build_mtt,
    "dp_inner": build_dp_inner,
}


def leaves(tree) -> list:
    """``(path, array)`` for every leaf, as NumPy arrays, in a fixed order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))
    return [(jax.tree_util.keystr(path), np.asarray(leaf)) for path, leaf in flat]


def digest(tree) -> str:
    """SHA-256 of every leaf's path, dtype, shape and bytes."""
    h = hashlib.sha256()
    for path, a in leaves(tree):
        h.update(f"{path}|{a.dtype.str}|{a.shape}|".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def main(names) -> dict:
    """``{case: digest}``: each case built and run once, in this process."""
    return {name: digest(BUILDERS[name]()()) for name in (names or list(BUILDERS))}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
