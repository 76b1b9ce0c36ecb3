r"""Peak memory and time of one MTT iteration vs the number of student steps N, per memory mode.

  python benchmarks/mtt_memory.py                      # widths 32,128; N 10,20,30,40,80
  python benchmarks/mtt_memory.py --widths=32 --steps=10,30 --modes=remat --iters=2

Every point runs in a fresh subprocess (so ``ru_maxrss`` is that point's peak resident memory):
a ConvNet-3 (instance norm, width W) on 10 images/class of 28x28x1, a full-set synthetic batch,
DSA on, the student unrolled N steps, and the gradient with respect to the images and the step
size. ``jax:<mode>`` uses ``dp_jax.distill.mtt.TrajectoryMatcher`` (python-driven steps, as
``loop='auto'`` picks on CPU); ``torch`` is MTT's own formulation: flat parameters, N
``autograd.grad(create_graph=True)`` steps, then one backward pass. Both frameworks get the same
cores (``sched_setaffinity``) and thread count, and run one after the other, never together.

Points whose memory, extrapolated linearly from the smaller N of the same series, would exceed
``--max_rss_gb`` are skipped and reported as such. Prints one JSON object per point and a final
JSON summary (memory ratio N=max/N=min per mode; torch/jax time ratio at N=30).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (this directory; imports no jax)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def worker_jax(p: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import ml_collections

    from dp_jax import masks
    from dp_jax.data.augment import make_augment
    from dp_jax.distill import mtt
    from dp_jax.models import create_model, init_variables

    model = create_model(ml_collections.ConfigDict(
        dict(name="convnet", width=p["width"], depth=3, norm="instance")), num_classes=10)
    p0 = init_variables(model, jax.random.key(0), (28, 28, 1))["params"]
    p1 = jax.tree.map(lambda a: a + 0.01 * jax.random.normal(jax.random.key(1), a.shape), p0)
    mask = masks.ones_like(p0)
    n = 10 * p["ipc"]
    x = jax.random.normal(jax.random.key(2), (n, 28, 28, 1))
    y = jnp.arange(n) % 10
    base = _peak_mb()
    m = mtt.TrajectoryMatcher(model, num_steps=p["N"], batch_size=n,
                              augment=make_augment("dsa") if p["dsa"] else None,
                              memory=p["mode"], loop=p["loop"], fast_conv=p["fast_conv"])
    t0 = time.perf_counter()
    jax.block_until_ready(m(x, y, jnp.log(0.01), p0, p1, mask, jax.random.key(0)))
    first = time.perf_counter() - t0
    times, cpu = [], []
    for i in range(p["iters"]):
        c0, t0 = _cpu_s(), time.perf_counter()
        jax.block_until_ready(m(x, y, jnp.log(0.01), p0, p1, mask, jax.random.key(i + 1)))
        times.append(time.perf_counter() - t0)
        cpu.append(_cpu_s() - c0)
    return {"first_call_s": first, "s_per_iter": min(times), "cpu_util": sum(cpu) / sum(times),
            "baseline_rss_mb": base}


def worker_torch(p: dict) -> dict:
    import math

    import torch
    import torch.nn.functional as F
    torch.set_num_threads(p["threads"])
    torch.manual_seed(0)
    w, n = p["width"], 10 * p["ipc"]
    shapes = []
    cin = 1
    for _ in range(3):
        shapes += [(w, cin, 3, 3), (w,), (w,), (w,)]  # conv weight, conv bias, gn scale, gn bias
        cin = w
    shapes += [(10, w * 16), (10,)]
    sizes = [math.prod(s) for s in shapes]
    start = torch.cat([torch.randn(k) * 0.1 for k in sizes])
    target = start + 0.01 * torch.randn_like(start)
    images = torch.randn(n, 1, 28, 28, requires_grad=True)
    labels = torch.arange(n) % 10
    syn_lr = torch.tensor(0.01, requires_grad=True)

    def forward(flat, x):
        parts = list(torch.split(flat, sizes))
        ps = [t.view(s) for t, s in zip(parts, shapes)]
        for i in range(3):
            cw, cb, gs, gb = ps[4 * i:4 * i + 4]
            x = F.conv2d(x, cw, cb, padding=3 if i == 0 else 1)
            x = F.avg_pool2d(F.relu(F.group_norm(x, w, gs, gb)), 2)
        return F.linear(x.flatten(1), ps[12], ps[13])

    def dsa(x):  # one random op per call, per-example parameters (as DiffAugment 'S' mode)
        b = x.shape[0]
        op = int(torch.randint(0, 6, ()))
        if op == 0:
            x = x + (torch.rand(b, 1, 1, 1) - 0.5)
            m = x.mean(dim=[1, 2, 3], keepdim=True)
            return (x - m) * (torch.rand(b, 1, 1, 1) + 0.5) + m
        if op == 3:
            return torch.where(torch.rand(b, 1, 1, 1) < 0.5, x.flip(3), x)
        if op == 2:
            mask = torch.ones_like(x)
            for i in range(b):
                r, c = torch.randint(0, 28, (2,)).tolist()
                mask[i, :, max(r - 7, 0):r + 7, max(c - 7, 0):c + 7] = 0
            return x * mask
        theta = torch.zeros(b, 2, 3)
        if op == 1:
            theta[:, 0, 0] = theta[:, 1, 1] = 1
            theta[:, :, 2] = (torch.randint(-4, 5, (b, 2)) / 14.0)
        elif op == 4:
            theta[:, 0, 0] = torch.rand(b) * (1.2 - 1 / 1.2) + 1 / 1.2
            theta[:, 1, 1] = torch.rand(b) * (1.2 - 1 / 1.2) + 1 / 1.2
        else:
            a = (torch.rand(b) - 0.5) * 2 * 15 / 180 * math.pi
            theta[:, 0, 0], theta[:, 0, 1] = torch.cos(a), torch.sin(a)
            theta[:, 1, 0], theta[:, 1, 1] = -torch.sin(a), torch.cos(a)
        grid = F.affine_grid(theta, list(x.shape), align_corners=True)
        return F.grid_sample(x, grid, align_corners=True)

    def iteration():
        student = [start.clone().requires_grad_(True)]
        for _ in range(p["N"]):
            xb = images[torch.randperm(n)]
            if p["dsa"]:
                xb = dsa(xb)
            ce = F.cross_entropy(forward(student[-1], xb), labels)
            g = torch.autograd.grad(ce, student[-1], create_graph=True)[0]
            student.append(student[-1] - syn_lr * g)
        loss = ((student[-1] - target) ** 2).sum() / ((start - target) ** 2).sum()
        loss.backward()
        images.grad = None
        syn_lr.grad = None

    base = _peak_mb()
    t0 = time.perf_counter()
    iteration()
    first = time.perf_counter() - t0
    times, cpu = [], []
    for _ in range(p["iters"]):
        c0, t0 = _cpu_s(), time.perf_counter()
        iteration()
        times.append(time.perf_counter() - t0)
        cpu.append(_cpu_s() - c0)
    return {"first_call_s": first, "s_per_iter": min(times), "cpu_util": sum(cpu) / sum(times),
            "baseline_rss_mb": base}


def run_worker(spec: str) -> None:
    p = json.loads(spec)
    os.sched_setaffinity(0, set(range(p["threads"])))
    out = worker_torch(p) if p["framework"] == "torch" else worker_jax(p)
    out["peak_rss_mb"] = _peak_mb()
    print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--widths", default="32,128")
    ap.add_argument("--steps", default="10,20,30,40,80")
    ap.add_argument("--modes", default="unroll,remat,constant")
    ap.add_argument("--torch", default="yes", choices=["yes", "no"])
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--iters", type=int, default=2, help="timed iterations (min is reported)")
    ap.add_argument("--threads", type=int, default=1, help="cores for each framework")
    ap.add_argument("--loop", default="python", choices=["python", "scan"])
    ap.add_argument("--fast_conv", default="yes", choices=["yes", "no"])
    ap.add_argument("--dsa", default="yes", choices=["yes", "no"])
    ap.add_argument("--max_rss_gb", type=float, default=8.0)
    ap.add_argument("--timeout_s", type=float, default=3600)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        run_worker(args.worker)
        return
    env = dict(os.environ)
    # One XLA:CPU thread pool sized like torch's (affinity also restricts both).
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=1"
                        ).strip()
    series = [(f"jax:{m}", m) for m in args.modes.split(",") if m]
    if args.torch == "yes":
        series.append(("torch", None))
    results = []
    for width in [int(w) for w in args.widths.split(",")]:
        for name, mode in series:
            done = []
            for n_steps in [int(s) for s in args.steps.split(",")]:
                rec = {"width": width, "series": name, "N": n_steps}
                if len(done) >= 2:  # linear extrapolation of peak memory in N
                    (n0, m0), (n1, m1) = done[-2], done[-1]
                    pred = m1 + (m1 - m0) / max(n1 - n0, 1) * (n_steps - n1)
                    if pred > args.max_rss_gb * 1024:
                        rec.update(skipped=f"predicted peak {pred / 1024:.1f} GB > "
                                           f"--max_rss_gb={args.max_rss_gb}")
                        print(json.dumps(rec), flush=True)
                        results.append(rec)
                        continue
                p = {"framework": "torch" if mode is None else "jax", "mode": mode,
                     "width": width, "N": n_steps, "ipc": args.ipc, "iters": args.iters,
                     "threads": args.threads, "loop": args.loop,
                     "fast_conv": args.fast_conv == "yes", "dsa": args.dsa == "yes"}
                try:
                    proc = subprocess.run([sys.executable, os.path.abspath(__file__),
                                           "--worker", json.dumps(p)], env=env,
                                          capture_output=True, text=True,
                                          timeout=args.timeout_s)
                    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                    if line:
                        rec.update(json.loads(line[-1][7:]))
                        done.append((n_steps, rec["peak_rss_mb"]))
                    else:
                        rec.update(error=(proc.stderr or proc.stdout)[-800:])
                except subprocess.TimeoutExpired:
                    rec.update(error=f"timeout after {args.timeout_s} s")
                print(json.dumps(rec), flush=True)
                results.append(rec)
    summary = {"memory_ratio_max_over_min_N": {}, "torch_over_jax_time_at_N30": {}}
    for width in {r["width"] for r in results}:
        for name, _ in series:
            pts = [r for r in results if r["width"] == width and r["series"] == name
                   and "peak_rss_mb" in r]
            if len(pts) >= 2:
                summary["memory_ratio_max_over_min_N"][f"w{width}/{name}"] = {
                    "N": [pts[0]["N"], pts[-1]["N"]],
                    "ratio": pts[-1]["peak_rss_mb"] / pts[0]["peak_rss_mb"]}
        ref = [r for r in results if r["width"] == width and r["series"] == "torch"
               and r["N"] == 30 and "s_per_iter" in r]
        for r in results:
            if (ref and r["width"] == width and r["N"] == 30 and r["series"] != "torch"
                    and "s_per_iter" in r):
                summary["torch_over_jax_time_at_N30"][f"w{width}/{r['series']}"] = (
                    ref[0]["s_per_iter"] / r["s_per_iter"])
    print(json.dumps({"summary": summary, "points": results, "host": common.host_info()},
                     indent=1))


if __name__ == "__main__":
    main()
