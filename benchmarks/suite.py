r"""One benchmark suite for whatever backend JAX finds: one JSON object and a markdown table.

  python benchmarks/suite.py [--quick] [--json-out F] [--md-out F] [--parts P1,P2] [--no-torch]

Parts (each a script of this directory, run as its own process so thread settings and peak
memory are its own; a part that fails is reported as failed and the suite goes on):

  peak      matmul_peak.py: the device's matmul peak in this run (f32; bf16 / TF32 where the
            device has them). Every later part's model-FLOP utilisation is against it
            (passed down as $DP_JAX_BENCH_PEAK_GFLOPS).
  train     train_throughput.py: training images/s of LeNet-300-100, ConvNet-3 width 32 and 128,
            with PyTorch's figures of the same step.
  resnet    resnet_throughput.py: ResNet-18 at IDC width 32 on 32x32x3, one device.
  dp_inner  dp_inner_loop.py: Distilled Pruning's inner loop (100 images, batch 100, with and
            without DSA) vs PyTorch; S inner seeds as one vmapped program vs sequential.
  seeds     seeds_vmap.py: S seeds' real-data training as one vmapped program vs sequential
            (what parallel.vmap_seeds=auto is set from).
  mtt       mtt_memory.py: one MTT iteration of ConvNet-3 width 32 at N = 20 and 40: time and
            peak memory per memory mode, PyTorch's create_graph unroll beside it (10 images
            per class; 5 with --quick on CPU).
  hvp       hvp_rate.py: Hessian-vector products per second (one and eight at a time).
  alpha     instability_alpha_sweep.py: the linear-interpolation sweep, vmapped vs a loop.
  kernels   library_kernels.py (CPU only, opt-in: --parts=...,kernels): XLA:CPU's YNNPACK
            settings against PyTorch, one pinned core, and the patch-product rule per setting.

Every part runs under glibc's transparent huge pages for malloc (``--malloc=hugetlb``, the
default: how dp_jax's commands run, dp_jax/system/hugepages.py; PyTorch gets the same), or stock
(``--malloc=stock``).

Sizes scale with the backend: on CPU one thread per framework (both pinned to one core), few
steps with ``--quick`` (designed for <= 15 minutes on a 2-core CPU); on GPU/TPU larger batches
and step counts (designed for <= 8 minutes with ``--quick``). Each figure carries its thread
count and CPU utilisation in the JSON; compile time is reported apart from run time.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (this directory; imports no jax)

HERE = os.path.dirname(os.path.abspath(__file__))
PARTS = ("peak", "train", "resnet", "dp_inner", "seeds", "mtt", "hvp", "alpha", "kernels")
# Run only when asked (--parts): 4 settings x 6 processes take ~25 minutes with --quick.
OPT_IN = ("kernels",)


def part_commands(backend: str, quick: bool, torch: bool) -> dict[str, list[str]]:
    """The command line of every part for ``backend`` (``cpu`` or an accelerator)."""
    cpu = backend == "cpu"
    threads = "1" if cpu else "2"
    no_torch = [] if torch else ["--no-torch"]
    if cpu and quick:  # both loop forms (the scan is LeNet's fast one), capped per runner
        train = ["--loops", "scan,python", "--repeats", "3", "--budget-s", "6"]
    elif cpu:
        train = ["--loops", "scan,python", "--repeats", "5", "--budget-s", "60"]
    else:
        train = ["--loops", "scan,python", "--repeats", "5", "--budget-s", "20"]
    return {
        "peak": ["matmul_peak.py", "--threads", threads, "--repeats", "3" if quick else "5"]
        + no_torch,
        "train": ["train_throughput.py", "--threads", threads, *train] + no_torch,
        "resnet": ["resnet_throughput.py", "--width", "32", "--devices", "1",
                   "--threads", threads, "--batch", "32" if cpu else "256",
                   "--steps", ("2" if quick else "5") if cpu else "20"],
        # CPU --quick: the figures of the last full runs at a fraction of the steps (the vmapped
        # ConvNet seeds and DSA dominated a 27-minute quick suite).
        "dp_inner": ["dp_inner_loop.py", "--threads", threads,
                     "--steps", ("30" if quick else "300") if cpu else "1000",
                     "--repeats", "1" if quick and cpu else "2" if quick else "3",
                     "--seeds", "2" if quick and cpu else "4"] + no_torch,
        "seeds": ["seeds_vmap.py", "--threads", threads, "--seeds", "2" if quick and cpu else "4",
                  "--steps", ("8" if quick else "100") if cpu else "200",
                  "--repeats", "1" if quick and cpu else "2" if quick else "3"],
        "mtt": ["mtt_memory.py", "--widths", "32" if quick else "32,128",
                "--steps", "20,40" if quick else "20,30,40", "--threads", threads,
                "--modes", "unroll,remat" if quick else "unroll,remat,constant",
                "--iters", "1" if quick else "2", "--torch", "yes" if torch else "no"]
        + (["--ipc", "5"] if quick and cpu else []),  # 50 images: half the iteration time
        "hvp": ["hvp_rate.py", "--threads", threads, "--repeats", "2" if quick else "5"]
        + (["--examples", "250"] if quick and cpu else []),
        "alpha": ["instability_alpha_sweep.py", "--repeats", "2" if quick else "5",
                  "--batch_sizes", "2000" if quick else "10000,2000,250"],
        "kernels": ["library_kernels.py"] + (["--quick"] if quick else []),
    }


def last_json(text: str):
    """The JSON object that ends ``text`` (parts may print progress records before it)."""
    dec = json.JSONDecoder()
    pos = 0
    while True:
        i = text.find("{", pos)
        if i < 0:
            raise ValueError("no JSON object in the output")
        if i == 0 or text[i - 1] == "\n":
            try:
                obj, end = dec.raw_decode(text, i)
                if not text[end:].strip():
                    return obj
            except json.JSONDecodeError:
                pass
        pos = i + 1


def run_part(name: str, cmd: list[str], env: dict, timeout_s: float) -> dict:
    """Run one part; ``{"ok", "wall_s", "result" | "error"}``."""
    t0 = time.perf_counter()
    print(f"[suite] {name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    try:
        proc = subprocess.run([sys.executable, os.path.join(HERE, cmd[0]), *cmd[1:]], env=env,
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"ok": False, "wall_s": time.perf_counter() - t0,
                "error": f"timeout after {timeout_s:.0f} s"}
    wall = time.perf_counter() - t0
    if proc.returncode:
        return {"ok": False, "wall_s": wall, "error": proc.stderr[-2000:]}
    try:
        return {"ok": True, "wall_s": wall, "result": last_json(proc.stdout)}
    except ValueError as e:
        return {"ok": False, "wall_s": wall, "error": f"{e}: {proc.stdout[-500:]}"}


def detect_backend() -> str:
    """JAX's default backend, asked in a child process (the suite itself never loads jax)."""
    out = subprocess.run([sys.executable, "-c", "import jax; print(jax.default_backend())"],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--parts", default=",".join(n for n in PARTS if n not in OPT_IN))
    p.add_argument("--no-torch", action="store_true", help="skip every PyTorch reference")
    p.add_argument("--json-out", default="")
    p.add_argument("--md-out", default="")
    p.add_argument("--timeout-s", type=float, default=1800.0, help="per part")
    p.add_argument("--malloc", default="hugetlb", choices=("hugetlb", "stock"),
                   help="hugetlb: every part (both frameworks) under GLIBC_TUNABLES="
                        "glibc.malloc.hugetlb=1, as dp_jax's commands run (dp_jax/system/hugepages.py)")
    args = p.parse_args(argv)
    parts = [s for s in args.parts.split(",") if s]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        p.error(f"--parts: unknown {unknown}; allowed: {','.join(PARTS)}")
    torch = not args.no_torch and importlib.util.find_spec("torch") is not None
    backend = detect_backend()
    if backend != "cpu" and "kernels" in parts:  # the flag is XLA:CPU's
        parts.remove("kernels")
    cmds = part_commands(backend, args.quick, torch)
    env = dict(os.environ)
    if args.malloc == "hugetlb" and "glibc.malloc.hugetlb" not in env.get("GLIBC_TUNABLES", ""):
        env["GLIBC_TUNABLES"] = ":".join(t for t in (env.get("GLIBC_TUNABLES", ""),
                                                     "glibc.malloc.hugetlb=1") if t)
    if backend != "cpu":
        env.setdefault("JAX_PLATFORMS", backend)
    t0 = time.perf_counter()
    res = {"benchmark": "suite", "backend": backend, "quick": args.quick, "malloc": args.malloc,
           "torch": torch or "not installed / --no-torch: PyTorch figures skipped",
           "host": common.host_info(), "parts": {}}
    for name in parts:
        res["parts"][name] = run_part(name, cmds[name], env, args.timeout_s)
        if name == "peak" and res["parts"][name]["ok"]:
            env["DP_JAX_BENCH_PEAK_GFLOPS"] = str(res["parts"][name]["result"]["peak_gflops"])
    res["peak_gflops"] = float(env.get("DP_JAX_BENCH_PEAK_GFLOPS", 0)) or None
    res["wall_s"] = time.perf_counter() - t0
    from suite_table import markdown  # noqa: E402  (this directory)
    md = markdown(res)
    text = json.dumps(res, indent=1)
    print(text)
    print(md, file=sys.stderr)
    for path, body in ((args.json_out, text), (args.md_out, md)):
        if path:
            with open(path, "w") as f:
                f.write(body + "\n")
    return 0 if all(r["ok"] for r in res["parts"].values()) else 1


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    sys.exit(main())
