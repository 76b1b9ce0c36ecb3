"""Training throughput of dp_jax's masked train step against a PyTorch reference of the same step.

    python benchmarks/train_throughput.py [--models lenet_300_100,convnet32,convnet128]
                                          [--steps N] [--threads 1|2] [--repeats R]

What is measured (per model, images/s at batch 128, 28x28x1 inputs, 10 classes):
  * ours: ``dp_jax.training.trainer.Trainer.train`` -- the code path every experiment uses -- with a full
    (all-True) mask pytree, SGD momentum 0.9 + coupled weight decay 5e-4 from
    ``dp_jax.training.optimizers.make_optimizer``, the dataset resident on the device, for both loop forms
    (``scan``: one compiled program per segment; ``python``: a jitted step per iteration);
  * torch: the same model and optimiser in PyTorch (NCHW, eager), masked the usual way
    (forward with ``weight * mask``, gradients masked, weights re-masked after the step), the
    dataset resident in memory and each minibatch gathered from an epoch permutation, as ours.

Both frameworks run in this process, one at a time (rounds alternate between them, rotating the
order), with the same thread count. Compilation/warm-up is excluded from the throughput and
reported separately. Every figure has the CPU utilisation of its interval next to it. See
benchmarks/README.md for how to read the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (no jax import; safe before the XLA flags are set)

MODEL_SPECS = {
    "lenet_300_100": {"name": "lenet_300_100"},
    "convnet32": {"name": "convnet", "width": 32, "depth": 3, "norm": "instance", "pool": "avg"},
    "convnet64": {"name": "convnet", "width": 64, "depth": 3, "norm": "instance", "pool": "avg"},
    "convnet128": {"name": "convnet", "width": 128, "depth": 3, "norm": "instance", "pool": "avg"},
}
# Timed steps per repeat when --steps is not given (a repeat is then ~0.3-5 s on one core).
DEFAULT_STEPS = {"lenet_300_100": 200, "convnet32": 20, "convnet64": 10, "convnet128": 5}
IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10
BATCH = 128
TARGET_RATIO = 1.2
LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 5e-4


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="lenet_300_100,convnet32,convnet128",
                   help=f"comma-separated, from {sorted(MODEL_SPECS)}")
    p.add_argument("--steps", type=int, default=0,
                   help="timed steps per repeat (default: per model, %s)" % DEFAULT_STEPS)
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per framework and loop")
    p.add_argument("--threads", type=int, default=1, choices=(1, 2))
    p.add_argument("--loops", default="scan,python", help="dp_jax loop forms to measure")
    p.add_argument("--unroll", type=int, default=1,
                   help="Trainer(unroll=...) for the scan loop (the config default is 1)")
    p.add_argument("--train-size", type=int, default=60000,
                   help="approximate dataset size (rounded so an epoch is whole timed segments)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    p.add_argument("--pin", default="auto",
                   help="CPU affinity: 'auto' (pin to --threads CPUs when fewer than available; "
                        "needed for a real 1-thread XLA), 'none', or a list like '1'")
    p.add_argument("--budget-s", type=float, default=90.0,
                   help="cap on timed seconds per framework/loop and model: slow runners (the "
                        "rolled scan over conv steps) get fewer repeats, at least 1")
    p.add_argument("--malloc-hugetlb", action="store_true",
                   help="re-run under GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (transparent huge "
                        "pages for malloc: fewer page faults, for both frameworks)")
    p.add_argument("--xla-flags", default="", help="extra XLA flags (space separated)")
    p.add_argument("--wide-channels", type=int, default=0,
                   help="dp_jax.models.convs.WIDE_CHANNELS for this run (0: the module's value); "
                        "a huge value turns the patch-product adjoints off")
    p.add_argument("--json-out", default="", help="also write the JSON to this file")
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    for m in args.models:
        if m not in MODEL_SPECS:
            p.error(f"unknown model {m!r}; choose from {sorted(MODEL_SPECS)}")
    args.loops = [lp for lp in args.loops.split(",") if lp]
    for lp in args.loops:
        if lp not in ("scan", "python"):
            p.error(f"--loops entries must be 'scan' or 'python', got {lp!r}")
    if args.steps < 0 or args.repeats < 1:
        p.error("--steps must be >= 0 and --repeats >= 1")
    return args


# ----------------------------------------------------------------------------- FLOPs


def train_flops_per_image(model, variables) -> dict:
    """Matmul/conv FLOPs of one training image: forward + weight grads + input grads.

    2 FLOPs per multiply-add; forward, weight-gradient and input-gradient passes each cost the
    layer's forward FLOPs, except that the first layer needs no input gradient. Elementwise work
    (norms, activations, pooling, the optimiser) is not counted, so MFU is an upper-bound-free,
    matmul-only figure.
    """
    import jax
    import jax.numpy as jnp
    from dp_jax import masks as masks_lib

    x = jax.ShapeDtypeStruct((1, *IMAGE_SHAPE), jnp.float32)
    _, inter = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=True, capture_intermediates=True,
                                 mutable=["intermediates"]), variables, x)
    inter = inter["intermediates"]
    fwd, first = 0, 0
    for path, kernel in masks_lib.prunable_leaves(variables["params"]).items():
        module = path.split("/")[:-1]
        node = inter
        for name in module:
            node = node[name]
        out_shape = node["__call__"][0].shape
        if kernel.ndim == 4:  # conv HWIO; output (1, H, W, C)
            kh, kw, cin, cout = kernel.shape
            macs = kh * kw * cin * cout * out_shape[1] * out_shape[2]
            is_first = cin == IMAGE_SHAPE[-1]
        else:
            macs = kernel.shape[0] * kernel.shape[1]
            is_first = kernel.shape[0] == math.prod(IMAGE_SHAPE)
        fwd += 2 * macs
        if is_first:
            first += 2 * macs
    return {"forward": fwd, "train": 3 * fwd - first}


# ----------------------------------------------------------------------------- ours (dp_jax)


class JaxRunner:
    """``steps`` steps of ``Trainer.train`` per call, from where the last call stopped."""

    def __init__(self, loop, spec, x, y, *, num_train, steps, unroll, seed=0):
        import jax
        from dp_jax import masks as masks_lib
        from dp_jax.models import create_model, init_variables
        from dp_jax.training import optimizers
        from dp_jax.training import trainer as train_lib
        from dp_jax.training.settings import TrainSettings

        self.jax = jax
        cfg = TrainSettings.from_config(optimizer="sgd", lr=LR, momentum=MOMENTUM,
                                        weight_decay=WEIGHT_DECAY, schedule="constant")
        model = create_model(spec, num_classes=NUM_CLASSES)
        tx = optimizers.make_optimizer(cfg, total_steps=10**6)
        variables = init_variables(model, jax.random.key(seed), IMAGE_SHAPE)
        mask = masks_lib.ones_like(variables["params"])
        self.model, self.variables = model, variables
        self.trainer = train_lib.Trainer(model, tx, batch_size=BATCH, num_train=num_train,
                                         loop=loop, unroll=unroll)
        self.state = train_lib.create_state(variables, mask, tx)
        self.x, self.y, self.key, self.steps = x, y, jax.random.key(seed + 1), steps
        self.t = 0

    def __call__(self):
        self.state, _ = self.trainer.train(self.state, self.x, self.y, self.key,
                                           num_steps=self.t + self.steps)
        self.jax.block_until_ready(self.state)
        self.t += self.steps

    def loss_is_finite(self) -> bool:
        import numpy as np
        m = self.trainer.evaluate(self.state.params, self.state.batch_stats, self.state.mask,
                                  self.x[:1000], self.y[:1000])
        return bool(np.isfinite(m["loss"]))


# ----------------------------------------------------------------------------- PyTorch reference


def build_torch_model(torch, spec):
    """The same architectures in PyTorch (NCHW); weights of conv/linear layers are masked."""
    nn, F = torch.nn, torch.nn.functional

    class MaskedLeNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(784, 300), nn.Linear(300, 100)
            self.head = nn.Linear(100, NUM_CLASSES)

        def forward(self, x, masks):
            x = x.flatten(1)
            x = F.relu(F.linear(x, self.fc1.weight * masks["fc1.weight"], self.fc1.bias))
            x = F.relu(F.linear(x, self.fc2.weight * masks["fc2.weight"], self.fc2.bias))
            return F.linear(x, self.head.weight * masks["head.weight"], self.head.bias)

    class MaskedConvNet(nn.Module):
        # depth x [conv3x3 -> GroupNorm(C, C) (instance norm, affine) -> ReLU -> avgpool 2]
        def __init__(self, width, depth):
            super().__init__()
            self.convs, self.norms = nn.ModuleList(), nn.ModuleList()
            cin, hw = IMAGE_SHAPE[-1], IMAGE_SHAPE[0]
            for i in range(depth):
                pad = 3 if (i == 0 and cin == 1) else 1
                self.convs.append(nn.Conv2d(cin, width, 3, padding=pad))
                self.norms.append(nn.GroupNorm(width, width, affine=True))
                cin, hw = width, (hw + 2 * pad - 2) // 2
            self.head = nn.Linear(width * hw * hw, NUM_CLASSES)

        def forward(self, x, masks):
            for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
                x = F.conv2d(x, conv.weight * masks[f"convs.{i}.weight"], conv.bias,
                             padding=conv.padding)
                x = F.avg_pool2d(F.relu(norm(x)), 2)
            return F.linear(x.flatten(1), self.head.weight * masks["head.weight"], self.head.bias)

    if spec["name"] == "lenet_300_100":
        return MaskedLeNet()
    return MaskedConvNet(spec["width"], spec["depth"])


class TorchRunner:
    """``steps`` masked SGD steps per call; batches gathered from per-epoch permutations."""

    def __init__(self, torch, spec, x_nhwc, y, *, num_train, steps, seed=0):
        self.torch = torch
        torch.manual_seed(seed)
        self.model = build_torch_model(torch, spec)
        self.masks = {n: torch.ones_like(p) for n, p in self.model.named_parameters()
                      if n.endswith("weight") and p.ndim >= 2}
        self.masked = [(p, self.masks[n]) for n, p in self.model.named_parameters()
                       if n in self.masks]
        self.opt = torch.optim.SGD(self.model.parameters(), lr=LR, momentum=MOMENTUM,
                                   weight_decay=WEIGHT_DECAY)
        self.x = torch.from_numpy(x_nhwc).permute(0, 3, 1, 2).contiguous()  # NCHW, resident
        self.y = torch.from_numpy(y).long()
        self.n, self.steps, self.t = num_train, steps, 0
        self.spe = num_train // BATCH
        self.gen = torch.Generator().manual_seed(seed + 1)
        self.perm, self.perm_epoch = None, -1
        self.loss_sum = torch.zeros(())

    def step(self):
        torch, F = self.torch, self.torch.nn.functional
        epoch, i = divmod(self.t, self.spe)
        if epoch != self.perm_epoch:
            self.perm, self.perm_epoch = torch.randperm(self.n, generator=self.gen), epoch
        idx = self.perm[i * BATCH:(i + 1) * BATCH]
        xb, yb = self.x.index_select(0, idx), self.y.index_select(0, idx)
        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(xb, self.masks), yb)
        loss.backward()
        with torch.no_grad():
            for p, m in self.masked:
                p.grad.mul_(m)
        self.opt.step()
        with torch.no_grad():
            for p, m in self.masked:
                p.mul_(m)
            self.loss_sum += loss.detach()
        self.t += 1

    def __call__(self):
        for _ in range(self.steps):
            self.step()

    def loss_is_finite(self) -> bool:
        return bool(self.torch.isfinite(self.loss_sum))


# ----------------------------------------------------------------------------- driver


def bench_model(name, args, torch, peak):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from dp_jax.models import count_params

    spec = MODEL_SPECS[name]
    steps = args.steps or DEFAULT_STEPS[name]
    # An epoch is a whole number of timed segments, so every scan segment has one length
    # (one compiled program) and no segment straddles an epoch boundary.
    k = max(1, round(args.train_size / (BATCH * steps)))
    num_train = BATCH * steps * k
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((num_train, *IMAGE_SHAPE), dtype=np.float32)
    y_np = rng.integers(0, NUM_CLASSES, num_train).astype(np.int32)
    x, y = jax.device_put(jnp.asarray(x_np)), jax.device_put(jnp.asarray(y_np))
    images = steps * BATCH

    runners, first_call, repeats, samples = {}, {}, {}, {}
    for loop in args.loops:
        common.log(f"[{name}] compiling dp_jax loop={loop} ...")
        r = JaxRunner(loop, spec, x, y, num_train=num_train, steps=steps, unroll=args.unroll)
        _, m = common.measure(r)  # compile + one segment (the warm-up, not timed)
        first_call[loop] = m["wall_s"]
        runners[f"ours_{loop}"] = r
        _, m = common.measure(r)  # first timed segment; also sizes the repeats
        samples[f"ours_{loop}"] = [m]
        repeats[f"ours_{loop}"] = max(1, min(args.repeats, int(args.budget_s // m["wall_s"])))
    flops = train_flops_per_image(runners[f"ours_{args.loops[0]}"].model,
                                  runners[f"ours_{args.loops[0]}"].variables)
    nparams = count_params(runners[f"ours_{args.loops[0]}"].variables["params"])
    if torch is not None:
        common.log(f"[{name}] warming up torch ...")
        tr = TorchRunner(torch, spec, x_np, y_np, num_train=num_train, steps=steps)
        for _ in range(3):
            tr.step()
        runners["torch"] = tr
        _, m = common.measure(tr)
        samples["torch"] = [m]
        repeats["torch"] = max(1, min(args.repeats, int(args.budget_s // m["wall_s"])))

    # Round 0 was the sizing segment of each runner above; the rest interleave the runners.
    order = list(runners)
    for rep in range(1, args.repeats):
        rot = order[rep % len(order):] + order[:rep % len(order)]
        for key in rot:
            if rep < repeats[key]:
                _, m = common.measure(runners[key])
                samples[key].append(m)
        common.log(f"[{name}] repeat {rep + 1}/{args.repeats}: " + ", ".join(
            f"{key} {images / samples[key][-1]['wall_s']:.1f} img/s "
            f"(util {samples[key][-1]['cpu_util']:.2f})" for key in order))

    def summary(key):
        s = common.summarize_rate(samples[key], images, flops_per_item=flops["train"],
                                  peak_gflops=peak)
        out = {"images_per_s": s.pop("items_per_s"), "images_per_s_min": s.pop("items_per_s_min"),
               "images_per_s_max": s.pop("items_per_s_max"),
               "images_per_cpu_s": s.pop("items_per_cpu_s"), **s}
        out["step_ms"] = 1e3 * BATCH / out["images_per_s"]
        out["loss_finite"] = runners[key].loss_is_finite()
        return out

    ours = {}
    for loop in args.loops:
        o = summary(f"ours_{loop}")
        o["first_call_s"] = first_call[loop]
        o["compile_s_est"] = max(0.0, first_call[loop] - images / o["images_per_s"])
        ours[loop] = o
    result = {
        "spec": spec, "params": nparams, "num_train": num_train, "timed_steps_per_repeat": steps,
        "flops_per_image": flops["train"], "flops_per_step": flops["train"] * BATCH,
        "ours": ours,
    }
    if torch is not None:
        ref = summary("torch")
        result["torch"] = ref
        ratios = {loop: ours[loop]["images_per_s"] / ref["images_per_s"] for loop in args.loops}
        best_loop = max(ratios, key=ratios.get)
        result["ratio_ours_over_torch"] = {**ratios, "best_loop": best_loop,
                                           "best": ratios[best_loop]}
        result["ratio_ours_over_torch_per_cpu_s"] = {
            loop: ours[loop]["images_per_cpu_s"] / ref["images_per_cpu_s"] for loop in args.loops}
        result["meets_target"] = ratios[best_loop] >= TARGET_RATIO
    return result


def main(argv=None):
    args = parse_args(argv)
    if args.malloc_hugetlb:
        tun = os.environ.get("GLIBC_TUNABLES", "")
        if "glibc.malloc.hugetlb" not in tun:
            common.reexec_with_env(
                {"GLIBC_TUNABLES": ":".join(t for t in (tun, "glibc.malloc.hugetlb=1") if t)})
    threads = common.configure_threads(args.threads, args.xla_flags.split())
    pinned = common.pin_affinity(common.resolve_pinning(args.pin, args.threads))
    torch = None
    torch_threads = None
    if not args.no_torch:
        import torch as torch_mod  # the reference only; dp_jax never imports torch
        torch = torch_mod
        torch_threads = common.configure_torch_threads(torch, args.threads)
    import jax  # after the XLA flags are in the environment
    import flax
    import optax
    from dp_jax.models import convs
    if args.wide_channels:
        convs.WIDE_CHANNELS = args.wide_channels  # read when a step is traced

    peak = common.PEAK_GFLOPS[args.threads]
    out = {
        "benchmark": "train_throughput",
        "config": {
            "models": args.models, "threads": args.threads, "repeats": args.repeats,
            "loops": args.loops, "scan_unroll": args.unroll, "batch_size": BATCH,
            "image_shape": list(IMAGE_SHAPE), "num_classes": NUM_CLASSES,
            "optimizer": {"name": "sgd", "lr": LR, "momentum": MOMENTUM,
                          "weight_decay": WEIGHT_DECAY, "mask": "full (all True)"},
            "peak_gflops": peak, "target_ratio": TARGET_RATIO, "budget_s": args.budget_s,
            "thread_settings": threads, "torch_threads": torch_threads, "pinned_cpus": pinned,
            "wide_channels": convs.WIDE_CHANNELS,
        },
        "versions": {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
                     "torch": torch.__version__ if torch is not None else None,
                     "backend": jax.default_backend()},
        "host": common.host_info(),
        "models": {},
    }
    t0 = time.perf_counter()
    for name in args.models:
        out["models"][name] = bench_model(name, args, torch, peak)
        common.log(f"[{name}] done: " + json.dumps(out["models"][name].get("ratio_ours_over_torch")))
    out["host"]["loadavg_end"] = list(os.getloadavg())
    out["wall_s"] = time.perf_counter() - t0
    if torch is not None:
        best = {n: r["ratio_ours_over_torch"]["best"] for n, r in out["models"].items()}
        out["summary"] = {
            "ratio_best_loop": best,
            "ratio_scan": {n: r["ratio_ours_over_torch"].get("scan")
                           for n, r in out["models"].items()},
            "ratio_python": {n: r["ratio_ours_over_torch"].get("python")
                             for n, r in out["models"].items()},
            "min_ratio": min(best.values()),
            "all_meet_target": all(r["meets_target"] for r in out["models"].values()),
        }
    utils = [o["cpu_util"] for r in out["models"].values()
             for o in list(r["ours"].values()) + ([r["torch"]] if "torch" in r else [])]
    # Well below the thread count: other processes held the cores for part of the time. Wall-clock
    # figures are then low for every runner; compare the per-CPU-second ratios as well.
    out["host_contended"] = bool(utils) and min(utils) < 0.7 * args.threads
    common.emit_json(out, path=args.json_out or None)


if __name__ == "__main__":
    main()
