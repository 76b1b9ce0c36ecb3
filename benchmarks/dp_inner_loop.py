"""Distilled Pruning's inner loop: our compiled program vs an eager PyTorch loop, and vmapped seeds.

  python benchmarks/dp_inner_loop.py [--models lenet_300_100,convnet32] [--steps 300] [--threads 1]

The inner loop trains a masked network on a 100-image distilled set (10 classes x 10)
for ``--steps`` SGD steps (momentum 0.9, wd 5e-4, batch 100, without augmentation so
that both sides do the same work; the DSA variant of ours is reported beside it).
Ours is the loop form DP picks (``--loop auto``): ``dp_jax.training.small_set.make_inner_loop`` (one
``lax.scan``, jitted once) for LeNet, ``make_inner_python`` (one jitted step driven from
Python) for the ConvNet on CPU; the reference is the eager PyTorch loop of the original code with
masked weights. Also: S=4 inner seeds in one vmapped program vs 4 sequential calls.
Prints one JSON object; compile time is reported apart from the steady state.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (sets thread flags before jax is imported)


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="lenet_300_100,convnet32")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    p.add_argument("--pin", default="auto", help="CPUs to pin to: auto|none|LIST (common.py)")
    p.add_argument("--loop", default="auto", choices=("auto", "scan", "python"),
                   help="inner-loop form (auto: what DP picks on this backend)")
    return p.parse_args()


MODEL_CFG = {"lenet_300_100": {"name": "lenet_300_100"},
             "convnet32": {"name": "convnet", "width": 32, "depth": 3}}


def ours(name, steps, repeats, seeds, threads, loop):
    import jax
    import jax.numpy as jnp
    import ml_collections
    import optax

    from dp_jax import masks
    from dp_jax.training import small_set, trainer as train
    from dp_jax.data.augment import make_augment
    from dp_jax.models import create_model, init_variables

    model = create_model(ml_collections.ConfigDict(MODEL_CFG[name]), num_classes=10)
    v = init_variables(model, jax.random.key(0), (28, 28, 1))
    mask = masks.prune(masks.magnitude_scores(v["params"]), masks.ones_like(v["params"]), 0.5)
    x = jax.random.normal(jax.random.key(1), (100, 28, 28, 1))
    y = jnp.arange(100) % 10
    tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.01, momentum=0.9))
    # The loop form DP picks with dp.loop=auto: Python-driven steps for conv nets on CPU.
    form = train.resolve_loop(loop, v["params"], model, (28, 28, 1))

    def program(aug):
        """fn(keys) -> state for len(keys) seeds, in the chosen loop form."""
        if form == "python":
            fn = small_set.make_inner_python(model, tx, num_steps=steps, batch_size=100, augment=aug)
            return lambda keys: fn(v, mask, x, y, keys)
        fn = jax.jit(jax.vmap(small_set.make_inner_loop(model, tx, num_steps=steps, batch_size=100,
                                                    augment=aug),
                              in_axes=(None, None, None, None, 0)))
        return lambda keys: fn(v, mask, x, y, keys)

    out = {"loop": form}
    for label, aug in (("no_aug", None), ("dsa", make_augment("dsa"))):
        fn = program(aug)
        _, m0 = common.measure(lambda: jax.block_until_ready(fn(jax.random.key(2)[None])))
        samples = [common.measure(lambda: jax.block_until_ready(
            fn(jax.random.key(3 + r)[None])))[1] for r in range(repeats)]
        out[label] = {"compile_and_first_s": m0["wall_s"],
                      **common.summarize_rate(samples, steps)}
    # S seeds: one vmapped program vs S sequential runs of the single-seed program.
    fn = program(None)
    keys = jax.random.split(jax.random.key(7), seeds)
    jax.block_until_ready(fn(keys))
    jax.block_until_ready(fn(keys[:1]))  # compile the one-seed shape outside the timing too
    vm = [common.measure(lambda: jax.block_until_ready(fn(keys)))[1] for _ in range(repeats)]
    seq = [common.measure(lambda: [jax.block_until_ready(fn(keys[i:i + 1]))
                                   for i in range(seeds)])[1] for _ in range(repeats)]
    out["seeds"] = {"S": seeds, "vmapped": common.summarize_rate(vm, steps * seeds),
                    "sequential": common.summarize_rate(seq, steps * seeds)}
    out["seeds"]["speedup"] = (out["seeds"]["vmapped"]["items_per_s"]
                               / out["seeds"]["sequential"]["items_per_s"])
    return out


def torch_reference(name, steps, repeats, threads):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    common.configure_torch_threads(torch, threads)
    torch.manual_seed(0)
    if name == "lenet_300_100":
        net = nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100),
                            nn.ReLU(), nn.Linear(100, 10))
    else:  # MTT ConvNet-32 with the grayscale padding of the first conv, as dp_jax's
        layers, c = [], 1
        for d in range(3):
            layers += [nn.Conv2d(c, 32, 3, padding=3 if d == 0 else 1), nn.GroupNorm(32, 32),
                       nn.ReLU(), nn.AvgPool2d(2)]
            c = 32
        net = nn.Sequential(*layers, nn.Flatten(), nn.Linear(32 * 4 * 4, 10))
    weights = [p for n, p in net.named_parameters() if n.endswith("weight") and p.dim() >= 2]
    masks = [(torch.rand_like(w) > 0.5).float() for w in weights]
    x = torch.randn(100, 1, 28, 28)
    y = torch.arange(100) % 10

    def run():
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        for _ in range(steps):
            perm = torch.randperm(100)
            with torch.no_grad():
                for w, m in zip(weights, masks):
                    w.mul_(m)
            loss = F.cross_entropy(net(x[perm]), y[perm])
            opt.zero_grad()
            loss.backward()
            for w, m in zip(weights, masks):
                w.grad.mul_(m)
            opt.step()
    _, m0 = common.measure(run)
    samples = [common.measure(run)[1] for _ in range(repeats)]
    return {"first_s": m0["wall_s"], **common.summarize_rate(samples, steps)}


def main():
    args = parse()
    threads = common.configure_threads(args.threads)
    # Both frameworks pinned to the same CPUs: per-CPU-second ratios compare like with like.
    pinned = common.pin_affinity(common.resolve_pinning(args.pin, args.threads))
    result = {"benchmark": "dp_inner_loop", "steps": args.steps, "threads": threads,
              "pinned_cpus": pinned, "host": common.host_info(), "models": {}}
    for name in args.models.split(","):
        common.log(f"{name}: ours")
        o = ours(name, args.steps, args.repeats, args.seeds, args.threads, args.loop)
        row = result["models"][name] = {"ours": o}
        if args.no_torch:
            continue
        common.log(f"{name}: torch")
        t = torch_reference(name, args.steps, args.repeats, args.threads)
        row.update(torch_eager=t, ratio_steps_per_s=o["no_aug"]["items_per_s"] / t["items_per_s"],
                   ratio_per_cpu_s=o["no_aug"]["items_per_cpu_s"] / t["items_per_cpu_s"])
    common.emit_json(result)


if __name__ == "__main__":
    main()
