r"""Hessian-vector products per second of the analysis code (``dp_jax.analysis.hessian``).

  python benchmarks/hvp_rate.py [--models lenet_300_100,convnet32] [--examples 0] [--repeats 3]

For each model: a half-pruned network, the restricted Hessian on ``--examples`` training-shaped
inputs (0: 2000 for LeNet, 500 for the ConvNet; batches of 500), one HVP at a time
(``matvec``: what Lanczos does) and 8 at a time (``matvec_many``: what Hutchinson does).
Compilation (the first call) is reported apart. One JSON object on stdout.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (sets thread flags before jax is imported)

MODEL_CFG = {"lenet_300_100": {"name": "lenet_300_100"},
             "convnet32": {"name": "convnet", "width": 32, "depth": 3}}
DEFAULT_EXAMPLES = {"lenet_300_100": 2000, "convnet32": 500}
PROBES = 8


def bench(name: str, examples: int, repeats: int) -> dict:
    """HVP rates of one model."""
    import jax
    import jax.numpy as jnp
    import ml_collections

    from dp_jax.system import compile_time
    from dp_jax import masks
    from dp_jax.analysis.hessian import HessianEngine
    from dp_jax.models import create_model, init_variables

    model = create_model(ml_collections.ConfigDict(MODEL_CFG[name]), num_classes=10)
    v = init_variables(model, jax.random.key(0), (28, 28, 1))
    mask = masks.prune(masks.magnitude_scores(v["params"]), masks.ones_like(v["params"]), 0.5)
    x = jax.random.normal(jax.random.key(1), (examples, 28, 28, 1))
    y = jnp.arange(examples) % 10
    op = HessianEngine(model, v["params"]).bind(v["params"], v.get("batch_stats"), mask, x, y)
    one = jax.random.normal(jax.random.key(2), (op.engine.size,))
    many = jax.random.normal(jax.random.key(3), (PROBES, op.engine.size))
    out = {"examples": examples, "dim": op.dim}
    for label, fn, count in (("single", lambda: op.matvec(one).block_until_ready(), 1),
                             ("batched8", lambda: op.matvec_many(many).block_until_ready(),
                              PROBES)):
        with compile_time.Stopwatch() as sw:
            _, first = common.measure(fn)
        samples = [common.measure(fn)[1] for _ in range(repeats)]
        out[label] = {"compile_s": sw.seconds, "first_call_s": first["wall_s"],
                      **common.summarize_rate(samples, count)}
        out[label]["hvps_per_s"] = out[label].pop("items_per_s")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="lenet_300_100,convnet32")
    p.add_argument("--examples", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    settings = common.configure_threads(args.threads)
    pinned = common.pin_affinity(common.resolve_pinning("auto", args.threads))
    res = {"benchmark": "hvp_rate", "threads": settings, "pinned_cpus": pinned,
           "host": common.host_info(), "models": {}}
    for name in args.models.split(","):
        common.log(f"hvp: {name}")
        res["models"][name] = bench(name, args.examples or DEFAULT_EXAMPLES[name], args.repeats)
    common.emit_json(res)


if __name__ == "__main__":
    main()
