r"""XLA:CPU's library-kernel settings against PyTorch, in one run on one pinned core.

    python benchmarks/library_kernels.py [--quick] [--settings S1;S2] [--json-out F]

jaxlib 0.10.x sends dots, convolutions and reductions to YNNPACK library fusions
(``--xla_cpu_experimental_ynn_fusion_type``; default ``individual_dot,individual_convolution,
reduce``). For each setting -- the default, ``-individual_convolution``, ``-reduce``, both, and
YNNPACK off with oneDNN's dot fusion on (``SETTINGS``) -- this runs, each as its own process with that setting in ``XLA_FLAGS`` (XLA reads its flags once,
at start) and pinned to CPU 0 like its PyTorch reference:

  * ConvNet-3 (instance norm) width 32 and 128 training, ``train_throughput.py`` (scan loop),
    each with PyTorch's same step interleaved in the same process;
  * DP's inner loop on ConvNet-32, ``dp_inner_loop.py`` (ratio per CPU-second);
  * ResNet-18 width 32 (CIFAR stem, batch 32, 32x32x3) training steps, here, with a PyTorch
    ResNet-18 of the same shape in the same process;
  * the patch-product rule re-decided: ConvNet-3 width 32 with ``WIDE_CHANNELS = 32`` (its
    adjoints as patch products), width 128 and ResNet-18 with ``WIDE_CHANNELS = 64``, against
    the current setting (the rule off since the run of docs/performance.md; images/s of ours
    only: PyTorch is unchanged by it).

Prints one JSON object: per setting the ratios to PyTorch, the fraction of the matmul peak
(``common.PEAK_GFLOPS``) and the patch-rule comparison; ``summary`` names the fastest setting per
workload and the better patch rule per setting.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (no jax import; safe before the XLA flags are set)
from suite import last_json  # noqa: E402  (this directory; imports no jax)

HERE = os.path.dirname(os.path.abspath(__file__))
FLAG = "--xla_cpu_experimental_ynn_fusion_type"
# Each setting: the XLA flags it adds. "onednn_dot": YNNPACK off and oneDNN's library fusion of
# dots on (the one oneDNN path the pip wheels compile in; its convolution rewriter is not:
# docs/performance.md).
SETTINGS = {
    "default": [],
    "-individual_convolution": [f"{FLAG}=-individual_convolution"],
    "-reduce": [f"{FLAG}=-reduce"],
    "-individual_convolution,-reduce": [f"{FLAG}=-individual_convolution,-reduce"],
    "onednn_dot": [f"{FLAG}=", "--xla_cpu_use_onednn=true",
                   "--xla_cpu_experimental_onednn_fusion_type=dot"],
}
OWN_FLAGS = (FLAG, "--xla_cpu_use_onednn", "--xla_cpu_experimental_onednn_fusion_type")
RULE_AT = 64  # the WIDE_CHANNELS compared with the current setting


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer steps and repeats (a smoke run)")
    p.add_argument("--settings", default=";".join(SETTINGS),
                   help=f"';'-separated names of settings; allowed: {', '.join(SETTINGS)}")
    p.add_argument("--pin", default="0", help="the CPU every process is pinned to")
    p.add_argument("--json-out", default="")
    p.add_argument("--resnet-worker", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _env(setting: str) -> dict:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(OWN_FLAGS)]
    env["XLA_FLAGS"] = " ".join(flags + SETTINGS[setting])
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def _run(script: str, args: list[str], env: dict) -> dict:
    cmd = [sys.executable, os.path.join(HERE, script), *args]
    common.log("[library_kernels] " + " ".join(cmd[1:]))
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        return {"error": out.stderr[-2000:]}
    return last_json(out.stdout)


def _train(env, models, quick, pin, wide=0, torch=True) -> dict:
    args = ["--models", models, "--loops", "scan", "--threads", "1", "--pin", pin,
            "--repeats", "3" if quick else "5", "--budget-s", "12" if quick else "40",
            "--malloc-hugetlb"] + (["--wide-channels", str(wide)] if wide else []) + \
        ([] if torch else ["--no-torch"])
    res = _run("train_throughput.py", args, env)
    if "error" in res:
        return res
    return {name: {"images_per_s": m["ours"]["scan"]["images_per_s"],
                   "mfu": m["ours"]["scan"].get("mfu"),
                   "ratio_to_torch": (m.get("ratio_ours_over_torch") or {}).get("scan")}
            for name, m in res["models"].items()}


def _inner(env, quick, pin) -> dict:
    res = _run("dp_inner_loop.py", ["--models", "convnet32", "--steps", "50" if quick else "100",
                                    "--seeds", "1", "--repeats", "2" if quick else "3",
                                    "--threads", "1", "--pin", pin], env)
    if "error" in res:
        return res
    m = res["models"]["convnet32"]
    return {"steps_per_s": m["ours"]["no_aug"]["items_per_s"],
            "ratio_to_torch_per_cpu_s": m.get("ratio_per_cpu_s")}


def _resnet(env, quick, pin, wide) -> dict:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--resnet-worker",
                          f"{wide},{int(quick)}", "--pin", pin], env=env, capture_output=True,
                         text=True)
    if out.returncode:
        return {"error": out.stderr[-2000:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def resnet_worker(spec: str, pin: str) -> dict:
    """ResNet-18 width 32 training steps, ours and PyTorch's, interleaved in this process."""
    wide, quick = (int(v) for v in spec.split(","))
    common.configure_threads(1)
    common.pin_affinity([int(pin)])
    import torch
    common.configure_torch_threads(torch, 1)
    import functools

    import jax
    import numpy as np
    from dp_jax import masks
    from dp_jax.models import convs, create_model, init_variables
    from dp_jax.training import optimizers, trainer as train
    from dp_jax.training.settings import TrainSettings
    import torch_models  # this directory

    if wide:
        convs.WIDE_CHANNELS = wide
    batch, steps = 32, 3 if quick else 5
    model = create_model({"name": "resnet18", "width": 32}, num_classes=10)
    variables = init_variables(model, jax.random.key(0), (32, 32, 3))
    tx = optimizers.make_optimizer(TrainSettings.from_config(
        optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=5e-4, schedule="constant"), 1000)
    state = train.create_state(variables, masks.ones_like(variables["params"]), tx)
    rng = np.random.default_rng(0)
    x = jax.device_put(rng.normal(size=(batch, 32, 32, 3)).astype(np.float32))
    y = jax.device_put(rng.integers(0, 10, size=batch).astype(np.int32))
    key = jax.random.key(1)
    lowered = jax.jit(functools.partial(train.train_step, model=model, tx=tx),
                      donate_argnums=0).lower(state, x, y, key)
    ca = lowered.cost_analysis()
    flops = float((ca[0] if isinstance(ca, (list, tuple)) else ca)["flops"])
    step = lowered.compile()
    box = {"state": step(state, x, y, key)[0]}

    def ours():
        for _ in range(steps):
            box["state"], m = step(box["state"], x, y, key)
        jax.block_until_ready(m)

    ref = torch_models.resnet18_step(torch, width=32, batch=batch)
    ref()  # warm-up
    samples = {"ours": [], "torch": []}
    for _ in range(2 if quick else 3):
        for name, fn in (("ours", ours), ("torch", lambda: [ref() for _ in range(steps)])):
            samples[name].append(common.measure(fn)[1])
    peak = common.PEAK_GFLOPS[1]
    rate = {k: common.summarize_rate(v, steps * batch, flops_per_item=flops / batch,
                                     peak_gflops=peak) for k, v in samples.items()}
    return {"wide_channels": convs.WIDE_CHANNELS,  # None: the rule is off "images_per_s": rate["ours"]["items_per_s"],
            "mfu": rate["ours"].get("mfu"), "torch_images_per_s": rate["torch"]["items_per_s"],
            "ratio_to_torch": rate["ours"]["items_per_s"] / rate["torch"]["items_per_s"]}


def one_setting(setting: str, quick: bool, pin: str) -> dict:
    """Every workload under one library-fusion setting."""
    env = _env(setting)
    row = {"XLA_FLAGS": env["XLA_FLAGS"],
           "train": _train(env, "convnet32,convnet128", quick, pin),
           "dp_inner_convnet32": _inner(env, quick, pin),
           "resnet18_w32": _resnet(env, quick, pin, 0)}
    row["patch_rule"] = {
        "convnet32_wide32": _train(env, "convnet32", quick, pin, wide=32, torch=False),
        "convnet128_rule_on": _train(env, "convnet128", quick, pin, wide=RULE_AT, torch=False),
        "resnet18_w32_rule_on": _resnet(env, quick, pin, RULE_AT)}
    return row


def _rate(row, *path):
    for p in path:
        row = (row or {}).get(p) if isinstance(row, dict) else None
    return row


def summarize(rows: dict) -> dict:
    """The fastest setting per workload, and per setting whether the patch rule pays."""
    workloads = {"convnet32 training": ("train", "convnet32", "ratio_to_torch"),
                 "convnet128 training": ("train", "convnet128", "ratio_to_torch"),
                 "dp inner loop convnet32": ("dp_inner_convnet32", "ratio_to_torch_per_cpu_s"),
                 "resnet18 w32 training": ("resnet18_w32", "ratio_to_torch")}
    fastest = {}
    for name, path in workloads.items():
        vals = {s: _rate(r, *path) for s, r in rows.items() if _rate(r, *path)}
        if vals:
            fastest[name] = {"setting": max(vals, key=vals.get), "ratios_to_torch": vals}
    rule = {}
    for s, r in rows.items():
        pr = r.get("patch_rule", {})
        rule[s] = {
            "convnet32: wide32 / current": _ratio(_rate(pr, "convnet32_wide32", "convnet32",
                                                        "images_per_s"),
                                                  _rate(r, "train", "convnet32", "images_per_s")),
            "convnet128: rule at 64 / current": _ratio(
                _rate(pr, "convnet128_rule_on", "convnet128", "images_per_s"),
                _rate(r, "train", "convnet128", "images_per_s")),
            "resnet18: rule at 64 / current": _ratio(
                _rate(pr, "resnet18_w32_rule_on", "images_per_s"),
                _rate(r, "resnet18_w32", "images_per_s"))}
    return {"fastest": fastest, "patch_rule_speed_ratio": rule}


def _ratio(a, b):
    return a / b if a and b else None


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.resnet_worker:
        print(json.dumps(resnet_worker(args.resnet_worker, args.pin)))
        return 0
    t0 = time.perf_counter()
    names = [s for s in args.settings.split(";") if s]
    unknown = [s for s in names if s not in SETTINGS]
    if unknown:
        raise SystemExit(f"--settings: unknown {unknown}; allowed: {', '.join(SETTINGS)}")
    rows = {s: one_setting(s, args.quick, args.pin) for s in names}
    common.emit_json({"benchmark": "library_kernels", "quick": args.quick, "pinned_cpu": args.pin,
                      "peak_gflops_assumed": common.PEAK_GFLOPS[1], "settings": rows,
                      "summary": summarize(rows), "wall_s": time.perf_counter() - t0},
                     path=args.json_out or None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
