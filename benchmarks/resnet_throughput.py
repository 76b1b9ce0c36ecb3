"""ResNet-18 (CIFAR stem) training-step throughput, model-FLOP utilisation and 1 -> N device scaling.

    python benchmarks/resnet_throughput.py [--width 64] [--batch 256] [--steps 2]
                                           [--devices 1,8] [--threads 2]

Measures ``dp_jax.training.trainer.train_step`` -- the masked SGD step of every experiment (momentum 0.9,
coupled weight decay 5e-4, BatchNorm in training mode) -- on 32x32x3 inputs at batch 256, jitted
with the batch sharded over a ``data`` mesh axis and the state replicated, as
``parallel.data_parallel=True`` runs it.

Model FLOPs per step come from XLA's cost analysis of the lowered (unpartitioned) step
(``jax.jit(step).lower(...).cost_analysis()``); MFU is the achieved model FLOP/s over the
measured f32 matmul peak of this CPU (``benchmarks/common.PEAK_GFLOPS``: ~100 GFLOP/s per
core). Each device count runs in its own process with
``XLA_FLAGS=--xla_force_host_platform_device_count=N``: on a CPU those N "devices" share the
same cores, so the table checks *correctness* (the loss of every step equals the 1-device loss)
and shows the partitioning overhead; it says nothing about accelerator scaling. Accelerator
numbers: run the same script on a GPU/TPU host (``--devices`` = the real device count).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (no jax import; safe before the XLA flags are set)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=64, help="ResNet-18 base width (64; 32 = IDC)")
    p.add_argument("--batch", type=int, default=256, help="global batch size")
    p.add_argument("--steps", type=int, default=2,
                   help="timed steps per device count (CPU: a step of width 64 takes seconds)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after compilation")
    p.add_argument("--devices", default="1,8", help="device counts of the scaling table")
    p.add_argument("--threads", type=int, default=2, choices=(1, 2))
    p.add_argument("--json-out", default="", help="also write the JSON to this file")
    p.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def worker(args) -> dict:
    """Runs in a process with ``args.worker`` (fake) devices; returns timings and losses."""
    n = args.worker
    threads = common.configure_threads(
        args.threads, extra_xla_flags=[f"--xla_force_host_platform_device_count={n}"]
        if common_cpu() else [])
    import functools

    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from dp_jax import masks
    from dp_jax.training import optimizers
    from dp_jax.training import trainer as train
    from dp_jax.training.settings import TrainSettings
    from dp_jax.models import create_model, init_variables

    devices = jax.devices()[:n]
    if len(devices) < n:
        raise SystemExit(f"asked for {n} devices, found {len(devices)}")
    model = create_model({"name": "resnet18", "width": args.width}, num_classes=10)
    variables = init_variables(model, jax.random.key(0), (32, 32, 3))
    tx = optimizers.make_optimizer(TrainSettings.from_config(
        optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=5e-4, schedule="constant"), 1000)
    mesh = Mesh(np.array(devices), ("data",))
    rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    state = jax.device_put(train.create_state(variables, masks.ones_like(variables["params"]), tx),
                           rep)
    rng = np.random.default_rng(0)
    x = jax.device_put(rng.normal(size=(args.batch, 32, 32, 3)).astype(np.float32), data)
    y = jax.device_put(rng.integers(0, 10, size=args.batch).astype(np.int32), data)
    key = jax.random.key(1)
    step = jax.jit(functools.partial(train.train_step, model=model, tx=tx), donate_argnums=0,
                   out_shardings=(rep, rep))
    lowered = step.lower(state, x, y, key)
    ca = lowered.cost_analysis()
    flops = float((ca[0] if isinstance(ca, (list, tuple)) else ca)["flops"])
    (compiled, t_compile) = common.measure(lambda: lowered.compile())
    losses = []
    for _ in range(args.warmup):
        state, m = compiled(state, x, y, key)
        losses.append(float(m["loss"]))
    samples = []
    for _ in range(args.steps):
        (state, m), t = common.measure(lambda: jax.block_until_ready(compiled(state, x, y, key)))
        samples.append(t)
        losses.append(float(m["loss"]))
    peak = common.PEAK_GFLOPS[args.threads]
    rate = common.summarize_rate(samples, 1, flops_per_item=flops, peak_gflops=peak)
    return {"devices": n, "backend": jax.default_backend(), "device_kind": devices[0].device_kind,
            "compile_s": t_compile["wall_s"], "steps_per_s": rate["items_per_s"],
            "images_per_s": rate["items_per_s"] * args.batch, "step_s": 1 / rate["items_per_s"],
            "cpu_util": rate["cpu_util"], "model_gflop_per_step": flops / 1e9,
            "achieved_gflops": rate.get("gflops"), "mfu": rate.get("mfu"),
            "losses": losses, "threads": threads}


def common_cpu() -> bool:
    """True unless the user asked for an accelerator platform (fake devices are CPU-only)."""
    return os.environ.get("JAX_PLATFORMS", "cpu") in ("", "cpu")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    rows = []
    for n in [int(d) for d in args.devices.split(",") if d]:
        if args.batch % n:
            raise SystemExit(f"--batch {args.batch} is not divisible by {n} devices")
        common.log(f"[resnet_throughput] {n} device(s), width {args.width}, batch {args.batch} ...")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", str(n),
               "--width", str(args.width), "--batch", str(args.batch), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--threads", str(args.threads)]
        env = dict(os.environ)
        env.setdefault("JAX_PLATFORMS", "cpu")
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(out.stderr[-3000:])
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]
    for r in rows:
        r["max_loss_diff_vs_first"] = max(abs(a - b) for a, b in zip(r["losses"], base["losses"]))
        r["speedup_vs_first"] = r["steps_per_s"] / base["steps_per_s"]
    result = {
        "benchmark": "resnet18_train_step", "width": args.width, "batch": args.batch,
        "image_shape": [32, 32, 3], "timed_steps": args.steps, "peak_gflops_assumed":
        common.PEAK_GFLOPS[args.threads], "host": common.host_info(), "scaling": rows,
        "note": ("CPU fake devices share the same cores: the scaling rows check that the "
                 "sharded step computes the same losses; their speed is not a scaling result"),
    }
    common.emit_json(result, path=args.json_out or None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
