r"""S seeds' real-data training as one vmapped program vs S runs one after another.

  python benchmarks/seeds_vmap.py [--models lenet_300_100,convnet32] [--seeds 4] [--steps 100]
      [--repeats 3] [--threads 1] [--loop auto]

What ``parallel.vmap_seeds`` chooses between: :meth:`dp_jax.training.trainer.Trainer.train_seeds` (S states
stacked, one program) against S calls of :meth:`dp_jax.training.trainer.Trainer.train`, on 28x28x1 inputs,
batch 128, SGD with momentum, a half-pruned mask. The ``speedup`` of each model is the figure
``auto`` is set from (docs/performance.md). Compilation (the first call) is reported apart.
One JSON object on stdout.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (sets thread flags before jax is imported)

MODEL_CFG = {"lenet_300_100": {"name": "lenet_300_100"},
             "convnet32": {"name": "convnet", "width": 32, "depth": 3}}
BATCH = 128


def bench(name: str, seeds: int, steps: int, repeats: int, loop: str) -> dict:
    """Vmapped and sequential training rates of one model."""
    import jax
    import jax.numpy as jnp
    import ml_collections
    import optax

    from dp_jax.system import compile_time
    from dp_jax import masks
    from dp_jax.training import trainer as train_lib
    from dp_jax.models import create_model, init_variables

    model = create_model(ml_collections.ConfigDict(MODEL_CFG[name]), num_classes=10)
    n = BATCH * steps
    x = jax.random.normal(jax.random.key(1), (n, 28, 28, 1))
    y = jnp.arange(n) % 10
    tx = optax.sgd(0.05, momentum=0.9)
    variables = [init_variables(model, jax.random.key(s), (28, 28, 1)) for s in range(seeds)]
    mask = masks.prune(masks.magnitude_scores(variables[0]["params"]),
                       masks.ones_like(variables[0]["params"]), 0.5)
    loop = train_lib.resolve_loop(loop, variables[0]["params"], model, (28, 28, 1))
    trainer = train_lib.Trainer(model, tx, batch_size=BATCH, num_train=n, loop=loop)
    keys = [jax.random.key(100 + s) for s in range(seeds)]

    def sequential():
        for v, k in zip(variables, keys):
            st, _ = trainer.train(train_lib.create_state(v, mask, tx), x, y, k, steps)
        return jax.block_until_ready(st.params)

    def vmapped():
        st = train_lib.stack([train_lib.create_state(v, mask, tx) for v in variables])
        st, _ = trainer.train_seeds(st, x, y, jnp.stack(keys), steps)
        return jax.block_until_ready(st.params)

    out = {"seeds": seeds, "steps": steps, "batch": BATCH, "loop": loop}
    for label, fn in (("sequential", sequential), ("vmapped", vmapped)):
        with compile_time.Stopwatch() as sw:
            _, first = common.measure(fn)
        samples = [common.measure(fn)[1] for _ in range(repeats)]
        out[label] = {"compile_s": sw.seconds, "first_call_s": first["wall_s"],
                      **common.summarize_rate(samples, seeds * steps * BATCH)}
    out["speedup"] = out["vmapped"]["items_per_s"] / out["sequential"]["items_per_s"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="lenet_300_100,convnet32")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--loop", default="auto", choices=("auto", "scan", "python"))
    args = p.parse_args()
    unknown = sorted(set(args.models.split(",")) - set(MODEL_CFG))
    if unknown:
        p.error(f"--models: unknown {unknown}; allowed: {','.join(MODEL_CFG)}")
    settings = common.configure_threads(args.threads)
    pinned = common.pin_affinity(common.resolve_pinning("auto", args.threads))
    res = {"benchmark": "seeds_vmap", "threads": settings, "pinned_cpus": pinned,
           "host": common.host_info(), "models": {}}
    for name in args.models.split(","):
        common.log(f"seeds_vmap: {name}")
        res["models"][name] = bench(name, args.seeds, args.steps, args.repeats, args.loop)
    common.emit_json(res)


if __name__ == "__main__":
    main()
