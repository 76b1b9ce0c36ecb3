"""Shared helpers for the scripts in ``benchmarks/``: thread pinning, timing, CPU use, JSON output.

Import this module *before* jax (it does not import jax itself): :func:`configure_threads` has
to put the XLA flags in the environment before XLA reads them, which happens once, when jax
initialises its CPU backend.

Conventions shared by every benchmark:
  * one JSON object on stdout (progress and diagnostics go to stderr);
  * every throughput figure carries the CPU utilisation of the process over the same interval
    (process CPU time / wall time, all threads): ~1.0 means one busy core, ~2.0 two; clearly
    below the thread count means the process was waiting (host contention, dispatch gaps);
  * model-FLOP utilisation (MFU) against a measured f32 matmul peak of this 2-core CPU.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any, Callable, Iterable, Optional

# f32 matmul peak of the project's reference CPU (jax, 2048^3), GFLOP/s, by thread count. The
# suite (suite.py) measures the peak first and passes it to every part in
# $DP_JAX_BENCH_PEAK_GFLOPS (measured at the thread count the parts then run with).
PEAK_GFLOPS = {1: 100.0, 2: 180.0}
if os.environ.get("DP_JAX_BENCH_PEAK_GFLOPS"):
    PEAK_GFLOPS = dict.fromkeys((1, 2), float(os.environ["DP_JAX_BENCH_PEAK_GFLOPS"]))

# XLA:CPU flags that keep XLA on one thread. The second token is not a '--' flag; XLA ignores it,
# but it is the form documented for single-threaded XLA:CPU and harmless to pass.
SINGLE_THREAD_XLA_FLAGS = ("--xla_cpu_multi_thread_eigen=false", "intra_op_parallelism_threads=1")
_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def configure_threads(threads: int, extra_xla_flags: Iterable[str] = ()) -> dict:
    """Pin the thread count of XLA (via ``XLA_FLAGS``) and of OpenMP/BLAS libraries.

    ``threads == 1``: XLA's Eigen single-threaded flags, and ``OMP/MKL/OPENBLAS_NUM_THREADS=1``.
    ``threads >= 2``: XLA's defaults (it sizes its pools from the visible cores) and the
    OpenMP/BLAS variables set to ``threads``. Torch needs ``torch.set_num_threads(threads)`` on
    top (see :func:`configure_torch_threads`). Must run before jax is imported.

    Returns the settings applied, for the JSON output.
    """
    if "jax" in sys.modules:
        raise RuntimeError("configure_threads() must be called before jax is imported")
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if f]
    if threads == 1:
        flags += [f for f in SINGLE_THREAD_XLA_FLAGS if f not in flags]
    flags += [f for f in extra_xla_flags if f and f not in flags]
    if flags:
        os.environ["XLA_FLAGS"] = " ".join(flags)
    for var in _THREAD_ENV:
        os.environ[var] = str(threads)
    return {"threads": threads, "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
            **{var: os.environ[var] for var in _THREAD_ENV}}


def configure_torch_threads(torch_module, threads: int) -> dict:
    """``torch.set_num_threads(threads)`` (and one inter-op thread, if still settable)."""
    torch_module.set_num_threads(threads)
    try:
        torch_module.set_num_interop_threads(1)
    except RuntimeError:  # already set, or parallel work has started
        pass
    return {"num_threads": torch_module.get_num_threads(),
            "num_interop_threads": torch_module.get_num_interop_threads()}


def pin_affinity(cpus: Optional[Iterable[int]]) -> Optional[list[int]]:
    """Restrict the process to ``cpus`` (Linux ``sched_setaffinity``); ``None`` leaves it alone.

    Call it before jax is imported: XLA:CPU sizes its intra-op thread pool from the CPUs the
    process may run on. In jax 0.10.2 the single-thread ``XLA_FLAGS`` alone still let XLA run a
    step's work on two pool threads (checked per thread in /proc); pinning the process to one CPU
    gives XLA a one-thread pool.
    """
    if cpus is None or not hasattr(os, "sched_setaffinity"):
        return None
    os.sched_setaffinity(0, set(cpus))
    return sorted(os.sched_getaffinity(0))


def resolve_pinning(spec: str, threads: int) -> Optional[list[int]]:
    """``"auto"``: pin to ``threads`` CPUs when that is fewer than the process may use (the
    highest-numbered ones), else no pinning; ``"none"``; or an explicit list ``"0,1"``."""
    if spec == "none" or not hasattr(os, "sched_getaffinity"):
        return None
    if spec == "auto":
        allowed = sorted(os.sched_getaffinity(0))
        return allowed[-threads:] if threads < len(allowed) else None
    return [int(c) for c in spec.split(",") if c.strip()]


def reexec_with_env(updates: dict) -> None:
    """Restart this script with ``updates`` added to the environment, unless already set.

    For settings read only at process start (e.g. ``GLIBC_TUNABLES``).
    """
    if all(os.environ.get(k) == v for k, v in updates.items()):
        return
    env = dict(os.environ, **updates)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable] + sys.argv, env)


def thread_cpu_seconds() -> dict:
    """``{thread id: CPU seconds}`` for every thread of this process (Linux /proc; else empty)."""
    out = {}
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out[tid] = (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return out


def cpu_seconds() -> float:
    """CPU time (user + system) of this process so far, summed over all its threads."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class Measurement(dict):
    """``{"wall_s", "cpu_s", "cpu_util", "busy_threads"}`` of one timed interval."""


def measure(fn: Callable[[], Any]) -> tuple[Any, Measurement]:
    """Run ``fn()`` once; return its result and the wall time, CPU time and utilisation.

    ``fn`` must block until its work is finished (``block_until_ready`` for jax).
    ``busy_threads`` counts the threads that used more than 10% of the interval's CPU time:
    the number of threads that really did the work (1 for a single-threaded run).
    """
    th0 = thread_cpu_seconds()
    c0, t0 = cpu_seconds(), time.perf_counter()
    out = fn()
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    th1 = thread_cpu_seconds()
    deltas = [th1[t] - th0.get(t, 0.0) for t in th1]
    busy = sum(1 for d in deltas if cpu > 0 and d > 0.1 * cpu)
    return out, Measurement(wall_s=wall, cpu_s=cpu, cpu_util=cpu / wall if wall > 0 else 0.0,
                            busy_threads=busy)


def summarize_rate(samples: list[Measurement], items: int, *, flops_per_item: float = 0.0,
                   peak_gflops: float = 0.0) -> dict:
    """Throughput of repeated measurements that each processed ``items`` items.

    The headline is the median; min/max show the spread (a wide spread means the host was
    busy). ``mfu`` = achieved model FLOP/s at the median / peak.
    """
    rates = sorted(items / s["wall_s"] for s in samples)
    med = statistics.median(rates)
    util = statistics.median(s["cpu_util"] for s in samples)
    out = {
        "items_per_s": med,
        "items_per_s_min": rates[0],
        "items_per_s_max": rates[-1],
        # Per CPU-second of the whole process: less sensitive to other processes on the host.
        "items_per_cpu_s": statistics.median(items / s["cpu_s"] for s in samples if s["cpu_s"] > 0)
        if any(s["cpu_s"] > 0 for s in samples) else None,
        "cpu_util": util,
        "cpu_util_min": min(s["cpu_util"] for s in samples),
        "busy_threads": max(s.get("busy_threads", 0) for s in samples),
        "repeats": len(samples),
    }
    if flops_per_item and peak_gflops:
        out["gflops"] = med * flops_per_item / 1e9
        out["mfu"] = out["gflops"] / peak_gflops
    return out


# The instruction-set extensions that decide which kernels XLA:CPU, oneDNN and YNNPACK pick.
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
             "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8",
             "asimd", "sve", "sve2")


def _versions() -> dict:
    # From the installed metadata: asking jax itself would import it (and read XLA_FLAGS).
    from importlib import metadata
    out = {}
    for pkg in ("jax", "jaxlib", "flax", "optax", "numpy", "torch"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _cpu() -> dict:
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and "cpu_model" not in info:
                    info["cpu_model"] = value.strip()
                elif key in ("flags", "Features") and "isa" not in info:
                    have = set(value.split())
                    info["isa"] = [f for f in ISA_FLAGS if f in have]
    except OSError:
        pass
    return info


def host_info() -> dict:
    """Machine facts worth having next to any number: versions, XLA flags, CPU model and ISA."""
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": _versions(),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        "cpu_count": os.cpu_count(),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", ""),
    }
    if hasattr(os, "sched_getaffinity"):
        info["affinity"] = sorted(os.sched_getaffinity(0))
    info.update(_cpu())
    return info


def log(*args) -> None:
    """Progress to stderr (stdout is reserved for the JSON result)."""
    print(*args, file=sys.stderr, flush=True)


def _round_floats(obj, digits: int = 4):
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}") if obj == obj and abs(obj) != float("inf") else obj
    if isinstance(obj, dict):
        return {k: _round_floats(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_round_floats(v, digits) for v in obj]
    return obj


def emit_json(obj: dict, *, path: Optional[str] = None, digits: int = 4) -> None:
    """Print ``obj`` as one JSON object on stdout (floats to ``digits`` significant digits),
    with the machine's facts under ``host`` (:func:`host_info`) unless it has them already."""
    obj = obj if "host" in obj else {**obj, "host": host_info()}
    text = json.dumps(_round_floats(obj, digits), indent=2, sort_keys=False)
    print(text, flush=True)
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")
