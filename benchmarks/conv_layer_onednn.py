r"""What a oneDNN convolution called from JAX could gain: one layer, forward and both adjoints.

    python benchmarks/conv_layer_onednn.py [--repeats 20]

XLA:CPU in the pip wheels has no oneDNN convolution (benchmarks/onednn_probe.py), so the one
road to oneDNN's kernels would be a ``jax.ffi`` call under ``custom_vjp`` (forward, input and
kernel gradients). Before building it, this measures the kernels it would call: PyTorch's CPU
convolutions are oneDNN's, so ``torch.nn.functional.conv2d`` and its two adjoints time the
library itself, against what dp_jax runs today for the same layer (XLA's convolution, and the
patch-product adjoints of ``dp_jax.models.convs`` for wide layers), one thread on one pinned
core, for the layers of ConvNet-3 width 32 and 128 at batch 128 and of ResNet-18 width 32.
An FFI call adds a few microseconds per call (negligible at these sizes) but no fusion with
the surrounding norm/ReLU, which XLA does today.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (no jax import; safe before the XLA flags are set)

# (name, batch, height/width, in channels, out channels): 3x3, stride 1, SAME.
LAYERS = [("convnet32 layer 2", 128, 14, 32, 32), ("convnet128 layer 2", 128, 14, 128, 128),
          ("resnet18-w32 stage 3", 32, 8, 128, 128)]


def _best(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def jax_layer(b, hw, ci, co, repeats, patch: bool) -> dict:
    """Seconds of XLA's forward, input gradient and kernel gradient of one layer."""
    import jax
    import jax.numpy as jnp
    from dp_jax.models import convs

    convs.WIDE_CHANNELS = 1 if patch else 10 ** 9
    x = jnp.ones((b, hw, hw, ci), jnp.float32)
    w = jnp.ones((3, 3, ci, co), jnp.float32) * 0.01
    pad = ((1, 1), (1, 1))
    fwd = jax.jit(lambda x, w: convs.conv(pad, x, w))
    dy = fwd(x, w)
    dx = jax.jit(lambda w, dy: jax.vjp(lambda x: convs.conv(pad, x, w), x)[1](dy)[0])
    dw = jax.jit(lambda x, dy: jax.vjp(lambda w: convs.conv(pad, x, w), w)[1](dy)[0])
    return {k: _best(lambda f=f, a=a: jax.block_until_ready(f(*a)), repeats)
            for k, (f, a) in {"forward": (fwd, (x, w)), "input_grad": (dx, (w, dy)),
                              "kernel_grad": (dw, (x, dy))}.items()}


def torch_layer(torch, b, hw, ci, co, repeats) -> dict:
    """Seconds of oneDNN's forward, input gradient and kernel gradient (through PyTorch)."""
    F = torch.nn.functional
    x = torch.ones(b, ci, hw, hw).contiguous(memory_format=torch.channels_last)
    w = (torch.ones(co, ci, 3, 3) * 0.01).contiguous(memory_format=torch.channels_last)
    dy = F.conv2d(x, w, padding=1)
    gi = torch.nn.grad.conv2d_input
    gw = torch.nn.grad.conv2d_weight
    with torch.no_grad():
        return {"forward": _best(lambda: F.conv2d(x, w, padding=1), repeats),
                "input_grad": _best(lambda: gi(x.shape, w, dy, padding=1), repeats),
                "kernel_grad": _best(lambda: gw(x, w.shape, dy, padding=1), repeats)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--pin", default="0")
    args = p.parse_args(argv)
    common.configure_threads(1)
    common.pin_affinity([int(args.pin)])
    import torch
    common.configure_torch_threads(torch, 1)
    rows = []
    for name, b, hw, ci, co in LAYERS:
        flops = 2 * b * hw * hw * ci * co * 9  # one of the three convolutions
        row = {"layer": name, "shape": [b, hw, hw, ci, co], "gflop_each": flops / 1e9,
               "xla": jax_layer(b, hw, ci, co, args.repeats, patch=False),
               "xla_patch_adjoints": jax_layer(b, hw, ci, co, args.repeats, patch=True),
               "onednn_via_torch": torch_layer(torch, b, hw, ci, co, args.repeats)}
        ours = sum(min(row["xla"][k], row["xla_patch_adjoints"][k]) for k in row["xla"])
        lib = sum(row["onednn_via_torch"].values())
        row["layer_speedup_if_onednn"] = ours / lib
        row["onednn_gflops"] = 3 * flops / 1e9 / lib
        row["ours_gflops"] = 3 * flops / 1e9 / ours
        rows.append(row)
    common.emit_json({"benchmark": "conv_layer_onednn", "repeats": args.repeats,
                      "peak_gflops_assumed": common.PEAK_GFLOPS[1], "layers": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
