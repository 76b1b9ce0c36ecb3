r"""Expected compute and device memory of a config: the numbers in the configs' docstrings.

  python launch/estimate.py configs/cifar10_resnet18.py:width=64 [--tflops 25]
  python launch/estimate.py configs/cifar10_resnet18.py --device_memory_gb 16   # exit 2 if too big

Model FLOPs per training image come from XLA's cost analysis of one lowered
forward+backward pass (``jax.jit(...).lower(...).cost_analysis()``: no compilation,
no weights materialised). A pruning experiment costs, per seed, the dense training
plus one full real-data training per round and method (every mask is evaluated by
training it), plus Distilled Pruning's mask search on the distilled set; masked
weights are not skipped (dense kernels), so sparsity does not reduce the FLOPs.
GPU-hours assume a sustained rate (``--tflops``, default 25 TFLOP/s: an A100 in
f32/TF32 at ~16% of peak); scale by your own measured rate.

Peak device memory (``memory``) comes from the compiled real-data training step:
``jax.jit(train_step, donate_argnums=0).lower(...).compile().memory_analysis()`` at the
config's batch size, model, optimiser, augmentation and ``train.compute_dtype``. The step
needs its arguments, outputs and temporaries at once; the donated state is counted once
(``argument + output + temp - alias``). On top come what a run keeps on the device between
steps: the training and test sets (``data.pipeline=memory``) and two copies of the weights
(the initial weights and a rewinding snapshot). Not counted: evaluation, ``vmap_seeds``
(multiplies the state), DP's inner loop and distillation, which run between trainings. The
program is compiled for the backend JAX finds; ``JAX_PLATFORMS`` defaults to ``cpu`` here, so
run with ``JAX_PLATFORMS=cuda`` on a GPU host for that backend's own figure (convolution
workspaces differ). With ``--device_memory_gb G`` a config whose peak exceeds G GB (2^30
bytes, as nvidia-smi and jax count) is refused: one line on stderr naming the need and the
limit, exit status 2. ``--skip_memory`` skips the compilation (FLOPs only).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
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


GB = 2 ** 30


def _nbytes(tree) -> int:
    import jax
    import numpy as np
    return int(sum(np.prod(a.shape, dtype=np.int64) * np.dtype(a.dtype).itemsize
                   for a in jax.tree.leaves(tree)))


def peak_memory(config, *, num_classes: int, image_shape: tuple, n_train: int,
                n_test: int) -> dict:
    """Device memory of a training run of ``config`` (bytes; see the module doc)."""
    import functools

    import jax
    import jax.numpy as jnp
    from dp_jax import masks
    from dp_jax.data import crops
    from dp_jax.models import create_model, init_variables
    from dp_jax.training import trainer as train_lib
    from dp_jax.training.settings import TrainSettings
    from dp_jax.training.optimizers import make_optimizer

    cfg = TrainSettings.from_config(config.train)
    B = int(cfg.batch_size)
    model = create_model(config.model, num_classes=num_classes)
    tx = make_optimizer(cfg, train_lib.total_steps(cfg.epochs, n_train, B))
    variables = jax.eval_shape(lambda k: init_variables(model, k, image_shape),
                               jax.random.key(0))
    state = jax.eval_shape(
        lambda v: train_lib.create_state(v, masks.ones_like(v["params"]), tx), variables)
    memory_data = config.data.get("pipeline", "memory") != "stream"
    augment = (crops.device_crop_flip
               if memory_data and config.data.get("augment", "none") == "crop_flip" else None)
    step = jax.jit(functools.partial(train_lib.train_step, model=model, tx=tx, augment=augment,
                                     compute_dtype=cfg.compute_dtype), donate_argnums=0)
    x = jax.ShapeDtypeStruct((B, *image_shape), jnp.float32)
    y = jax.ShapeDtypeStruct((B,), jnp.int32)
    key = jax.eval_shape(lambda: jax.random.key(0))
    ma = step.lower(state, x, y, key).compile().memory_analysis()
    arg, out = int(ma.argument_size_in_bytes), int(ma.output_size_in_bytes)
    temp, alias = int(ma.temp_size_in_bytes), int(ma.alias_size_in_bytes)
    step_bytes = arg + out + temp - alias
    pixels = math.prod(int(d) for d in image_shape)
    data = (n_train + n_test) * (pixels * 4 + 4) if memory_data else 0  # float32 x, int32 y
    held = 2 * _nbytes(variables)
    peak = step_bytes + data + held
    return {
        "backend": jax.default_backend(), "program": f"train_step, batch {B}, state donated",
        "argument_bytes": arg, "output_bytes": out, "temp_bytes": temp, "alias_bytes": alias,
        "step_bytes": step_bytes, "resident_data_bytes": data, "held_weights_bytes": held,
        "peak_bytes": peak, "peak_gb": peak / GB,
        "note": ("step (argument + output + temp - donated alias) + training and test sets on "
                 "the device + initial weights and a rewinding snapshot; evaluation, "
                 "vmap_seeds, DP's inner loop and distillation are not included"),
    }


def estimate(config, *, tflops: float, memory: bool = True) -> dict:
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
    out = {
        "data": name, "train_examples": n_train, "test_examples": n_test, "classes": classes,
        "image_shape": list(shape), "model": config.model.to_dict(), "params": f["params"],
        "gflop_per_image_forward": f["forward"] / 1e9, "gflop_per_image_train": f["train"] / 1e9,
        "steps_per_training": steps, "flop_per_training": per_training,
        "trainings_per_seed": trainings, "dp_mask_search_flop_per_seed": search,
        "flop_per_seed": per_seed, "seeds": seeds, "assumed_tflops": tflops,
        "gpu_hours_per_seed": hours(per_seed), "gpu_hours_total": hours(per_seed) * seeds,
        "note": "distillation (experts + MTT) is not included; see the config docstring",
    }
    if memory:
        out["memory"] = peak_memory(config, num_classes=classes, image_shape=tuple(shape),
                                    n_train=n_train, n_test=n_test or 0)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", help="config file, optionally with :variant")
    ap.add_argument("--tflops", type=float, default=25.0,
                    help="assumed sustained TFLOP/s per accelerator (default 25)")
    ap.add_argument("--device_memory_gb", type=float, default=None,
                    help="refuse (exit 2) a config whose peak device memory exceeds this many "
                         "GB (2^30 bytes) per device")
    ap.add_argument("--skip_memory", action="store_true",
                    help="FLOPs only: do not compile the training step for its memory")
    args = ap.parse_args(argv)
    if args.device_memory_gb is not None and args.skip_memory:
        ap.error("--device_memory_gb needs the memory estimate; drop --skip_memory")
    if args.device_memory_gb is not None and not args.device_memory_gb > 0:
        ap.error(f"--device_memory_gb must be > 0, got {args.device_memory_gb}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # no accelerator needed (see the doc)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = estimate(load_config(args.config), tflops=args.tflops, memory=not args.skip_memory)
    if args.device_memory_gb is not None:
        mem = result["memory"]
        if mem["peak_bytes"] > args.device_memory_gb * GB:
            print(f"estimate.py: {args.config} needs {mem['peak_gb']:.4g} GB of device memory "
                  f"(training step {mem['step_bytes'] / GB:.4g} GB + data on the device "
                  f"{mem['resident_data_bytes'] / GB:.4g} GB + weights held "
                  f"{mem['held_weights_bytes'] / GB:.4g} GB, compiled for "
                  f"{mem['backend']}), more than --device_memory_gb {args.device_memory_gb:g} "
                  "GB: refused", file=sys.stderr)
            return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
