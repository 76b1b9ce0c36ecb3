r"""Cost of one instability evaluation: an 11-point alpha sweep vmapped over alpha vs a Python loop.

  python benchmarks/instability_alpha_sweep.py [--alphas=11] [--repeats=5] \
      [--batch_sizes=10000,2000,250]

LeNet-300-100 on the Fashion-MNIST test set (10k images). Both variants run the
same per-alpha evaluation (``dp_jax.analysis.family.eval_point``, jitted): the
sweep vmaps it over alpha (one program per test batch), the baseline dispatches
it once per (alpha, test batch). Prints one JSON object: times (median and min of
interleaved repeats), the ratio, CPU utilisation per variant, and device/thread
information (the machine may be shared: the load average is reported too).
"""

import argparse
import functools
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (this directory)

from dp_jax import masks as masks_lib
from dp_jax.analysis import family, instability
from dp_jax.data import load_dataset
from dp_jax.models import create_model, init_variables


def _timed(fn):
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--alphas", type=int, default=11)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch_sizes", default="10000,2000,250")
    args = ap.parse_args()

    data = load_dataset(ml_collections.ConfigDict({"name": "fashion_mnist", "train_size": 0,
                                                   "preprocess": "standard"}), seed=0)
    model = create_model({"name": "lenet_300_100"}, num_classes=data.num_classes)
    va = init_variables(model, jax.random.key(1), data.image_shape)
    vb = init_variables(model, jax.random.key(2), data.image_shape)
    mask = masks_lib.ones_like(va["params"])
    x, y = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
    a, b = ({"params": v["params"], "batch_stats": {}} for v in (va, vb))
    anchors = family.stack([a, b])
    alphas = np.linspace(0, 1, args.alphas)
    coeffs = instability.interpolation_coeffs(alphas)
    sel = family.ones_selector(va["params"])
    per_alpha = jax.jit(functools.partial(family.eval_point, model=model))

    results = []
    for bs in [int(s) for s in args.batch_sizes.split(",")]:
        ev = family.FamilyEvaluator(model, eval_batch_size=bs)
        batches = family.pad_batches(x, y, bs)

        def sweep():
            return ev.evaluate(anchors, coeffs, mask, x, y, batches=batches)

        def loop():
            outs = []
            for c in coeffs:
                tot = None
                for xb, yb, wb in batches:
                    o = per_alpha(jnp.asarray(c), anchors["params"], sel, {}, mask, xb, yb, wb)
                    tot = o if tot is None else jax.tree.map(jnp.add, tot, o)
                outs.append(tot)
            outs = jax.device_get(outs)
            n = x.shape[0]
            return {"loss": np.array([o["loss"] for o in outs]) / n,
                    "error": 1 - np.array([o["correct"] for o in outs]) / n}

        t_compile = {"vmap": _timed(sweep)[0], "loop": _timed(loop)[0]}
        rv, rl = sweep(), loop()
        agree = float(np.max(np.abs(rv["loss"] - rl["loss"])))
        times = {"vmap": [], "loop": []}
        for _ in range(args.repeats):  # interleaved, so load changes hit both alike
            times["vmap"].append(_timed(sweep))
            times["loop"].append(_timed(loop))
        row = {"eval_batch_size": bs, "first_call_s": t_compile,
               "max_abs_loss_difference": agree}
        for k, ts in times.items():
            wall = np.array([t[0] for t in ts])
            cpu = np.array([t[1] for t in ts])
            row[k] = {"median_s": float(np.median(wall)), "min_s": float(wall.min()),
                      "cpu_utilisation": float(np.median(cpu / wall))}
        row["ratio_loop_over_vmap_median"] = row["loop"]["median_s"] / row["vmap"]["median_s"]
        row["ratio_loop_over_vmap_min"] = row["loop"]["min_s"] / row["vmap"]["min_s"]
        results.append(row)

    common.emit_json({
        "benchmark": "instability alpha sweep, LeNet-300-100, Fashion-MNIST test set",
        "alphas": args.alphas, "test_examples": int(x.shape[0]), "repeats": args.repeats,
        "results": results,
        "device": str(jax.devices()[0]), "backend": jax.default_backend(),
    })

if __name__ == "__main__":
    main()
