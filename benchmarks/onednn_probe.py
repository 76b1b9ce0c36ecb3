r"""Which of XLA:CPU's oneDNN options change the compiled program in the installed jaxlib.

    python benchmarks/onednn_probe.py

Compiles one convolution plus one matrix product under each flag set (each in its own process:
XLA reads its flags once) and prints, as one JSON object, the custom-call targets and fusion
kinds of the compiled HLO: ``__onednn$...`` custom calls come from the oneDNN contraction
rewriter, ``__onednn_fusion`` from oneDNN's library fusions, ``__ynn_fusion`` from YNNPACK's.
An option that leaves the program as the default compiles it is a no-op in this build.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (no jax import)

YNN_OFF = "--xla_cpu_experimental_ynn_fusion_type="
FLAG_SETS = {
    "default": "",
    "onednn_custom_call": "--xla_cpu_experimental_onednn_custom_call=true",
    "use_onednn+custom_call": "--xla_cpu_use_onednn=true "
                              "--xla_cpu_experimental_onednn_custom_call=true",
    "ynn_off+onednn_custom_call": f"{YNN_OFF} --xla_cpu_use_onednn=true "
                                  "--xla_cpu_experimental_onednn_custom_call=true",
    "ynn_off+onednn_fusion_dot": f"{YNN_OFF} --xla_cpu_use_onednn=true "
                                 "--xla_cpu_experimental_onednn_fusion_type=dot",
    "ynn_off+onednn_fusion_dot,eltwise,reduce": f"{YNN_OFF} --xla_cpu_use_onednn=true "
                                                "--xla_cpu_experimental_onednn_fusion_type="
                                                "dot,eltwise,reduce",
}

WORKER = r"""
import jax, jax.numpy as jnp, json, re
from jax import lax
def f(x, w, a, b):
    y = lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y.sum() + (a @ b).sum()
args = (jnp.ones((8, 28, 28, 32)), jnp.ones((3, 3, 32, 32)), jnp.ones((256, 512)),
        jnp.ones((512, 256)))
txt = jax.jit(f).lower(*args).compile().as_text()
print(json.dumps({"custom_calls": sorted(set(re.findall(r'custom_call_target="([^"]+)"', txt))),
                  "fusion_kinds": sorted(set(re.findall(r'"kind":"(__[a-z_]+)"', txt))),
                  "convolution_ops": len(re.findall(r"= \S+ convolution\(", txt))}))
"""


def probe(flags: str) -> dict:
    """The compiled program's library calls under ``flags``."""
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", WORKER], env=env, capture_output=True, text=True)
    if out.returncode:
        return {"error": out.stderr[-500:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    rows = {name: dict(flags=flags, **probe(flags)) for name, flags in FLAG_SETS.items()}
    base = {k: v for k, v in rows["default"].items() if k != "flags"}
    for r in rows.values():
        r["changes_program"] = {k: v for k, v in r.items() if k in base} != base
    common.emit_json({"benchmark": "onednn_probe", "flag_sets": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
