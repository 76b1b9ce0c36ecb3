r"""Expected compute of a config, from model FLOPs: the numbers in the configs' docstrings.

  python launch/estimate.py configs/cifar10_resnet18.py:width=64 [--tflops 25]

Model FLOPs per training image come from XLA's cost analysis of one lowered
forward+backward pass (``jax.jit(...).lower(...).cost_analysis()``: no compilation,
no weights materialised). A pruning experiment costs, per seed, the dense training
plus one full real-data training per round and method (every mask is evaluated by
training it), plus Distilled Pruning's mask search on the distilled set; masked
weights are not skipped (dense kernels), so sparsity does not reduce the FLOPs.
GPU-hours assume a sustained rate (``--tflops``, default 25 TFLOP/s: an A100 in
f32/TF32 at ~16% of peak); scale by your own measured rate.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# Training/test examples and classes of the datasets the paper configs name (before subsets).
DATASETS = {
    "fashion_mnist": (60_000, 10_000, 10, (28, 28, 1)),
    "tfds:cifar10": (50_000, 10_000, 10, (32, 32, 3)),
    "tfds:cifar100": (50_000, 10_000, 100, (32, 32, 3)),
    "tfds:imagenette/320px": (9_469, 3_925, 10, None),
    "tfds:imagenette/160px": (9_469, 3_925, 10, None),
    "tfds:imagenet2012": (1_281_167, 50_000, 1000, None),
}


def load_config(spec: str):
    """``path[:variant]`` -> ConfigDict, as ``--config`` would."""
    from dp_jax.config import files as config_files
    return config_files.load_config(spec)


def flops_per_image(config, num_classes: int, image_shape: tuple) -> dict:
    """Forward and forward+backward FLOPs per image of ``config.model`` (XLA cost analysis)."""
    import jax
    import jax.numpy as jnp
    from dp_jax.models import count_params, create_model, init_variables

    model = create_model(config.model, num_classes=num_classes)
    shapes = jax.eval_shape(lambda k: init_variables(model, k, image_shape), jax.random.key(0))
    batch = 8
    x = jax.ShapeDtypeStruct((batch, *image_shape), jnp.float32)
    has_bn = "batch_stats" in shapes

    def fwd(v, x):
        return model.apply(v, x, train=False)

    def loss(params, v, x):
        v = dict(v, params=params)
        if has_bn:
            out, _ = model.apply(v, x, train=True, mutable=["batch_stats"])
        else:
            out = model.apply(v, x, train=True)
        return jnp.sum(out)

    def cost(lowered):
        ca = lowered.cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        return float(ca["flops"]) / batch

    return {"forward": cost(jax.jit(fwd).lower(shapes, x)),
            "train": cost(jax.jit(jax.grad(loss)).lower(shapes["params"], shapes, x)),
            "params": count_params(shapes["params"])}


def estimate(config, *, tflops: float) -> dict:
    """Compute budget of ``config`` per seed and for all its seeds."""
    from dp_jax import methods

    name = str(config.data.name)
    n_train, n_test, classes, shape = DATASETS.get(name, (None, None, None, None))
    subset = tuple(config.data.get("classes", ()) or ())
    if subset and n_train:
        frac = len(subset) / classes
        n_train, n_test, classes = int(n_train * frac), int(n_test * frac), len(subset)
    if config.data.train_size:
        n_train = int(config.data.train_size)
    if n_train is None:
        raise ValueError(f"no size known for data.name={name!r}; add it to DATASETS")
    size = config.data.get("image_size", None)
    if size:
        shape = (size, size, 3 if shape is None else shape[2])
    f = flops_per_image(config, classes, shape)
    B = int(config.train.batch_size)
    steps = int(config.train.epochs) * (n_train // B)
    per_training = steps * B * f["train"] + n_test * f["forward"]
    specs = methods.parse(config.prune.method, config)
    R = int(config.prune.rounds)
    trainings = 1 + R * len(specs)
    search = 0.0
    dp = config.get("dp", None)
    small_set = sum(methods.get(s.name).needs_dp for s in specs)  # DP, DP-then-IMP, subset
    if dp is not None and small_set:
        inner = int(dp.get("steps", 0) or 0) * int(dp.get("batch_size", 0) or 0)
        search = small_set * R * inner * f["train"] * int(dp.get("inner_seeds", 1) or 1)
    per_seed = trainings * per_training + search
    seeds = int(config.seeds)
    hours = lambda flop: flop / (tflops * 1e12) / 3600  # noqa: E731
    return {
        "data": name, "train_examples": n_train, "test_examples": n_test, "classes": classes,
        "image_shape": list(shape), "model": config.model.to_dict(), "params": f["params"],
        "gflop_per_image_forward": f["forward"] / 1e9, "gflop_per_image_train": f["train"] / 1e9,
        "steps_per_training": steps, "flop_per_training": per_training,
        "trainings_per_seed": trainings, "dp_mask_search_flop_per_seed": search,
        "flop_per_seed": per_seed, "seeds": seeds, "assumed_tflops": tflops,
        "gpu_hours_per_seed": hours(per_seed), "gpu_hours_total": hours(per_seed) * seeds,
        "note": "distillation (experts + MTT) is not included; see the config docstring",
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", help="config file, optionally with :variant")
    ap.add_argument("--tflops", type=float, default=25.0,
                    help="assumed sustained TFLOP/s per accelerator (default 25)")
    args = ap.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # cost analysis only; no accelerator needed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    print(json.dumps(estimate(load_config(args.config), tflops=args.tflops), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
