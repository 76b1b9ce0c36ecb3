r"""The device's measured matmul peak, the denominator of every model-FLOP utilisation figure.

  python benchmarks/matmul_peak.py [--threads 1] [--size 0] [--repeats 5] [--no-torch]

Square matrix products C = A @ B (2 n^3 FLOPs) timed after a warm-up, best of ``--repeats``:
jax in float32 (and, on GPU, at ``precision=highest`` as well as the default, which may use
TF32), bfloat16 on accelerators (and on CPU, marked emulated), numpy's BLAS and PyTorch in
float32 on CPU. ``--size 0`` picks n per backend (2048 on CPU, 8192 on accelerators). One JSON
object on stdout; the suite (benchmarks/suite.py) takes ``peak_gflops`` from it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (sets thread flags before jax is imported)


def _best_gflops(fn, flops: float, repeats: int) -> dict:
    fn()  # warm-up (compilation, page faults)
    best, cpu = float("inf"), []
    for _ in range(repeats):
        _, m = common.measure(fn)
        best = min(best, m["wall_s"])
        cpu.append(m["cpu_util"])
    return {"gflops": flops / best / 1e9, "best_s": best, "cpu_util": max(cpu)}


def jax_peaks(n: int, repeats: int) -> dict:
    """jax matmul GFLOP/s per dtype (and precision on GPU)."""
    import jax
    import jax.numpy as jnp

    backend = jax.default_backend()
    out = {"backend": backend, "device": str(jax.devices()[0])}
    variants = [("f32", jnp.float32, None)]
    if backend == "gpu":
        variants += [("f32_highest", jnp.float32, jax.lax.Precision.HIGHEST)]
    variants += [("bf16", jnp.bfloat16, None)]
    for name, dtype, precision in variants:
        a = jax.random.normal(jax.random.key(0), (n, n), dtype)
        b = jax.random.normal(jax.random.key(1), (n, n), dtype)
        f = jax.jit(lambda x, y, p=precision: jnp.matmul(x, y, precision=p))
        out[name] = _best_gflops(lambda: f(a, b).block_until_ready(), 2.0 * n ** 3, repeats)
        if name == "bf16" and backend == "cpu":
            out[name]["note"] = "XLA:CPU has no native bf16 matmul (emulated); not a peak"
    return out


def host_peaks(n: int, repeats: int, with_torch: bool, threads: int) -> dict:
    """numpy (and torch) float32 matmul GFLOP/s on the host CPU."""
    import numpy as np

    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
    out = {"numpy_f32": _best_gflops(lambda: a @ b, 2.0 * n ** 3, repeats)}
    if with_torch:
        try:
            import torch
        except ImportError:
            out["torch_f32"] = {"skipped": "torch is not installed"}
        else:
            common.configure_torch_threads(torch, threads)
            ta, tb = torch.from_numpy(a), torch.from_numpy(b)
            out["torch_f32"] = _best_gflops(lambda: ta @ tb, 2.0 * n ** 3, repeats)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--size", type=int, default=0, help="n (0: 2048 on CPU, 8192 elsewhere)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-torch", action="store_true")
    args = p.parse_args()
    settings = common.configure_threads(args.threads)
    pinned = common.pin_affinity(common.resolve_pinning("auto", args.threads))
    import jax

    n = args.size or (2048 if jax.default_backend() == "cpu" else 8192)
    t0 = time.perf_counter()
    res = {"benchmark": "matmul_peak", "n": n, "threads": settings, "pinned_cpus": pinned,
           "host": common.host_info(), "jax": jax_peaks(n, args.repeats)}
    if jax.default_backend() == "cpu":
        res["host_blas"] = host_peaks(n, args.repeats, not args.no_torch, args.threads)
    res["peak_gflops"] = res["jax"]["f32"]["gflops"]
    res["wall_s"] = time.perf_counter() - t0
    common.emit_json(res)


if __name__ == "__main__":
    main()
