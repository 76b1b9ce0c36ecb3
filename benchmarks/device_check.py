r"""One check of a lent accelerator: peaks, GPU tests, the suite, an IMP round and DP's inner loop.

  bash benchmarks/device_check.sh [--dry-run] [--out DIR]            # the usual entry point
  python benchmarks/device_check.py --out DIR [--dry-run] [--budget-s 450]
                                    [--suite-parts alpha,hvp,seeds,train,mtt] [--skip STEPS]

Writes ``DIR/device_check.json`` (rewritten after every step, so a run cut short keeps what it
measured), ``DIR/device_check.md`` (the table) and ``DIR/logs/<step>.log``. Steps, each its own
process (own thread settings and device memory), in this order:

  env        jax/jaxlib/flax/optax versions, backend, devices and their memory, XLA flags,
             CPU model (benchmarks/common.host_info), nvidia-smi's GPU line
  peaks      measured matmul peaks (benchmarks/matmul_peak.jax_peaks): bf16; TF32 (the
             TF32_TF32_F32 dot algorithm, else jax.default_matmul_precision('tensorfloat32'));
             f32 (precision=highest on GPU); and f32 at the default precision, which is what
             an f32 training step gets (TF32 on Ampere/Hopper) and what MFU below divides by
  imp        one IMP round of ResNet-18 (CIFAR stem) width 32 on 32x32x3 random data through
             dp_jax.training.trainer.Trainer: dense training, 20 % global magnitude pruning,
             rewind to the initial weights, masked training; images/s, MFU, compile time, and
             whether the masked round compiled anything (it must not)
  dp_inner   DP's inner loop (small_set.make_inner_train, the loop form 'auto' picks) with the
             paper's recipe: 300 epochs over 400 images (IDC's 10 per class x factor 2^2),
             batch 64, DSA and CutMix, SGD with momentum; wall time of a compiled call
  pytest_gpu ``pytest -m gpu`` (whatever is marked; the count is recorded)
  readiness  tests/training/test_gpu_readiness.py on the device (transfer guard, retracing,
             donation, host reads; on a GPU device-to-host reads are guarded too)
  suite      benchmarks/suite.py --quick --no-torch, one part at a time (--suite-parts; the
             peak, resnet and dp_inner parts are this script's own steps), the measured f32
             peak passed down as $DP_JAX_BENCH_PEAK_GFLOPS; parts that no longer fit the
             budget are recorded as skipped

Every step runs under a timeout that keeps the whole run inside ``--budget-s`` (default 450 s:
with start-up, under 8 minutes); a step that fails or times out is recorded and the run goes
on. ``--dry-run`` runs the same steps at tiny sizes on the CPU (one to two minutes; a first
run compiles ResNet-18 with DSA on the CPU, later ones load it from dp_jax's compilation cache).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import common  # noqa: E402  (imports no jax)

STEPS = ("env", "peaks", "imp", "dp_inner", "pytest_gpu", "readiness", "suite")
CAPS_S = {"env": 60, "peaks": 60, "imp": 150, "dp_inner": 150, "pytest_gpu": 90,
          "readiness": 120, "suite": 300}
SUITE_PARTS = "alpha,hvp,seeds,train,mtt"
MIN_STEP_S = 10.0  # a step is skipped when less than this is left


# =============================================================================== child steps
# Each runs in its own process (``--step NAME``) and prints one JSON object on stdout.

def _peaks_from_env() -> dict:
    return json.loads(os.environ.get("DP_JAX_DEVICE_PEAKS", "{}") or "{}")


def _mfu(images_per_s: float, flops_per_image: float, peak_gflops) -> float | None:
    return images_per_s * flops_per_image / (peak_gflops * 1e9) if peak_gflops else None


def step_env(dry: bool) -> dict:
    import importlib.metadata as md

    import jax
    out = {"versions": {}, "backend": jax.default_backend(),
           "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
           "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", ""), "host": common.host_info()}
    for pkg in ("jax", "jaxlib", "flax", "optax", "chex", "orbax-checkpoint", "numpy", "pytest",
                "jax-cuda12-plugin", "jax-cuda12-pjrt", "torch"):
        try:
            out["versions"][pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    devices = []
    for d in jax.devices():
        info = {"id": d.id, "kind": d.device_kind, "platform": d.platform}
        try:
            stats = d.memory_stats() or {}
            info["bytes_limit"] = stats.get("bytes_limit")
        except Exception:  # noqa: BLE001  (not every backend reports memory)
            pass
        devices.append(info)
    out["devices"] = devices
    return out


def step_peaks(dry: bool) -> dict:
    import jax
    import jax.numpy as jnp

    import matmul_peak
    n, repeats = (256, 2) if dry else (8192, 5)
    res = {"n": n, "jax": matmul_peak.jax_peaks(n, repeats)}
    # TF32 explicitly: the dot algorithm where the backend has it, else the precision flag.
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    try:
        preset = jax.lax.DotAlgorithmPreset.TF32_TF32_F32
        f = jax.jit(lambda x, y: jnp.matmul(x, y, precision=preset))
        f(a, b).block_until_ready()
        how = "DotAlgorithmPreset.TF32_TF32_F32"
    except Exception:  # noqa: BLE001  (CPU: no TF32 algorithm)
        with jax.default_matmul_precision("tensorfloat32"):
            f = jax.jit(lambda x, y: jnp.matmul(x, y))
            f(a, b).block_until_ready()
        how = "jax.default_matmul_precision('tensorfloat32')"
    res["jax"]["tf32"] = matmul_peak._best_gflops(lambda: f(a, b).block_until_ready(),
                                                   2.0 * n ** 3, repeats)
    res["jax"]["tf32"]["how"] = how
    j = res["jax"]
    f32 = j.get("f32_highest", j["f32"])
    res["gflops"] = {"bf16": j["bf16"]["gflops"], "tf32": j["tf32"]["gflops"],
                     "f32": f32["gflops"], "f32_default": j["f32"]["gflops"]}
    if j["backend"] == "cpu":
        res["note"] = "CPU: bf16 is emulated and TF32 is plain f32; not accelerator peaks"
    return res


def _resnet(width: int, shape: tuple, classes: int = 10):
    import jax
    from dp_jax.models import create_model, init_variables
    model = create_model({"name": "resnet18", "width": width}, num_classes=classes)
    return model, init_variables(model, jax.random.key(0), shape)


def _train_flops_per_image(model, tx, state, batch: int, shape: tuple, augment=None) -> float:
    """XLA's cost analysis of one masked training step at ``batch`` (model FLOPs)."""
    import functools

    import jax
    import jax.numpy as jnp
    from dp_jax.training import trainer as train_lib
    step = jax.jit(functools.partial(train_lib.train_step, model=model, tx=tx, augment=augment))
    x = jax.ShapeDtypeStruct((batch, *shape), jnp.float32)
    y = jax.ShapeDtypeStruct((batch,), jnp.int32)
    ca = step.lower(state, x, y, jax.eval_shape(lambda: jax.random.key(0))).cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return float(ca["flops"]) / batch


class _Compiles:
    """Counts backend compilations while active (jax.monitoring)."""

    def __init__(self):
        import jax
        self.n, self._jax = 0, jax

    def _listen(self, event, duration_secs, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            self.n += 1

    def __enter__(self):
        self._jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc):
        self._jax.monitoring.unregister_event_duration_listener(self._listen)


def step_imp(dry: bool) -> dict:
    import statistics

    import jax
    import numpy as np
    from dp_jax import masks
    from dp_jax.data import crops
    from dp_jax.training import trainer as train_lib
    from dp_jax.training.settings import TrainSettings
    from dp_jax.training.optimizers import make_optimizer

    width, size, n, n_test, B, epochs = (4, 8, 64, 32, 16, (2, 2)) if dry else \
        (32, 32, 12_800, 2_000, 128, (2, 3))
    shape = (size, size, 3)
    model, variables = _resnet(width, shape)
    # configs/cifar10_resnet18.py's real-data recipe; crop+flip on the device.
    cfg = TrainSettings.from_config(lr=0.01, momentum=0.9, weight_decay=5e-4, batch_size=B,
                                    schedule="multistep", decay_at=(2 / 3, 5 / 6),
                                    decay_factor=0.2)
    steps0, steps1 = epochs[0] * (n // B), epochs[1] * (n // B)
    tx = make_optimizer(cfg, max(steps0, steps1))
    loop = train_lib.resolve_loop("auto", variables["params"], model, shape)
    tr = train_lib.Trainer(model, tx, batch_size=B, num_train=n, loop=loop,
                           augment=crops.device_crop_flip, eval_batch_size=min(500, n_test))
    rng = np.random.default_rng(0)
    x = jax.device_put(rng.standard_normal((n, *shape), dtype=np.float32))
    y = jax.device_put(rng.integers(0, 10, n).astype(np.int32))
    xt = jax.device_put(rng.standard_normal((n_test, *shape), dtype=np.float32))
    yt = jax.device_put(rng.integers(0, 10, n_test).astype(np.int32))
    dense = masks.ones_like(variables["params"])
    flops = _train_flops_per_image(model, tx, train_lib.create_state(variables, dense, tx), B,
                                   shape, crops.device_crop_flip)

    def run(mask, num_steps, key):
        marks = [time.perf_counter()]
        state = train_lib.create_state(variables, mask, tx)
        state, _ = tr.train(state, x, y, key, num_steps,
                            on_epoch=lambda e, m: marks.append(time.perf_counter()))
        epoch_s = [b - a for a, b in zip(marks, marks[1:])]
        return state, epoch_s

    t0 = time.perf_counter()
    state0, ep0 = run(dense, steps0, jax.random.key(1))
    t_eval = time.perf_counter()
    acc0 = tr.evaluate(state0.params, state0.batch_stats, dense, xt, yt)
    eval_first_s = time.perf_counter() - t_eval
    mask1 = masks.prune(masks.magnitude_scores(state0.params), dense, 0.2)
    with _Compiles() as compiles:  # a new mask and rewound weights: nothing to compile
        state1, ep1 = run(mask1, steps1, jax.random.key(1))
        t_eval = time.perf_counter()
        acc1 = tr.evaluate(state1.params, state1.batch_stats, mask1, xt, yt)
        eval_s = time.perf_counter() - t_eval
    round_s = time.perf_counter() - t0
    steady = statistics.median(ep1)
    ips = n // B * B / steady
    peaks = _peaks_from_env()
    return {
        "model": f"resnet18 width {width}", "image_shape": list(shape), "train_images": n,
        "batch": B, "loop": loop, "epochs": list(epochs), "params": int(sum(
            np.prod(a.shape) for a in jax.tree.leaves(variables["params"]))),
        "sparsity_after": masks.sparsity(mask1), "gflop_per_image_train": flops / 1e9,
        "epoch_s_dense": ep0, "epoch_s_masked": ep1,
        "compile_s_est": ep0[0] - steady, "eval_first_call_s": eval_first_s, "eval_s": eval_s,
        "images_per_s": ips, "step_ms": 1e3 * steady / (n // B),
        "achieved_tflops": ips * flops / 1e12,
        "mfu_vs_f32_default_peak": _mfu(ips, flops, peaks.get("f32_default")),
        "mfu_vs_bf16_peak": _mfu(ips, flops, peaks.get("bf16")),
        "compiles_in_masked_round": compiles.n, "test_accuracy": [acc0["accuracy"],
                                                                  acc1["accuracy"]],
        "round_wall_s": round_s,
        "note": "random data: accuracy is chance; MFU vs the f32-default (TF32 on GPU) peak",
    }


def step_dp_inner(dry: bool) -> dict:
    import jax
    import numpy as np
    from dp_jax import masks
    from dp_jax.data.augment import make_augment
    from dp_jax.training import small_set
    from dp_jax.training import trainer as train_lib

    width, size, n, B, epochs = (4, 8, 40, 8, 3) if dry else (32, 32, 400, 64, 300)
    shape = (size, size, 3)
    model, variables = _resnet(width, shape)
    # configs/cifar10_resnet18.py's PAPER_INNER (IDC's recipe on the decoded set).
    recipe = small_set.Recipe(lr=0.01, epochs=epochs, batch_size=B, momentum=0.9,
                              weight_decay=5e-4, decay_at=(2 / 3, 5 / 6), decay_factor=0.2,
                              cutmix_prob=0.5, cutmix_beta=1.0)
    loop = train_lib.resolve_loop("auto", variables["params"], model, shape)
    fn = small_set.make_inner_train(model, recipe, n, make_augment("dsa"), loop=loop,
                                    num_classes=10)
    mask = masks.prune(masks.magnitude_scores(variables["params"]),
                       masks.ones_like(variables["params"]), 0.2)
    rng = np.random.default_rng(0)
    xs = [jax.device_put(rng.standard_normal((n, *shape), dtype=np.float32)) for _ in range(2)]
    y = jax.device_put((np.arange(n) % 10).astype(np.int32))
    keys = [jax.random.split(jax.random.key(s), 1) for s in (1, 2)]
    _, first = common.measure(lambda: jax.block_until_ready(fn(variables, mask, xs[0], y,
                                                               keys[0])))
    with _Compiles() as compiles:
        (params, loss), second = common.measure(
            lambda: jax.block_until_ready(fn(variables, mask, xs[1], y, keys[1])))
    steps = recipe.num_steps(n)
    flops = _train_flops_per_image(model, recipe.optimizer(n), train_lib.create_state(
        variables, mask, recipe.optimizer(n)), B, shape)
    ips = steps * B / second["wall_s"]
    return {
        "model": f"resnet18 width {width}", "image_shape": list(shape), "images": n,
        "batch": B, "epochs": epochs, "steps": steps, "loop": loop,
        "augment": "dsa + cutmix (p 0.5)", "wall_s": second["wall_s"],
        "first_call_s": first["wall_s"], "compile_s_est": first["wall_s"] - second["wall_s"],
        "steps_per_s": steps / second["wall_s"], "images_per_s": ips,
        "mfu_vs_f32_default_peak": _mfu(ips, flops, _peaks_from_env().get("f32_default")),
        "final_loss": float(np.asarray(loss)[0]), "compiles_in_second_call": compiles.n,
    }


CHILD_STEPS = {"env": step_env, "peaks": step_peaks, "imp": step_imp, "dp_inner": step_dp_inner}


# =============================================================================== orchestration

class Run:
    def __init__(self, out: str, dry: bool, budget_s: float):
        self.out, self.dry, self.budget_s = out, dry, budget_s
        self.t0 = time.perf_counter()
        self.logs = os.path.join(out, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (ROOT, self.env.get("PYTHONPATH", "")) if p)
        if dry:
            self.env["JAX_PLATFORMS"] = "cpu"
        self.res = {"benchmark": "device_check", "dry_run": dry, "budget_s": budget_s,
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "env": {}, "steps": {},
                    "summary": {}}

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)

    def timeout(self, step: str) -> float:
        return min(CAPS_S[step], self.left())

    def command(self, name: str, cmd: list, timeout: float, env: dict | None = None):
        """Run ``cmd`` (logged to logs/<name>.log); ``(returncode | None, stdout, wall_s)``."""
        t0 = time.perf_counter()
        common.log(f"[device_check] {name}: {' '.join(cmd)} (timeout {timeout:.0f} s)")
        # Its own process group: a step that runs past its time is stopped with everything it
        # started (the suite's parts), so nothing keeps the device busy behind the next step.
        p = subprocess.Popen(cmd, cwd=ROOT, env=env or self.env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            stdout, stderr = p.communicate(timeout=timeout)
            rc = p.returncode
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            stdout, stderr = p.communicate()
            rc = None
        wall = time.perf_counter() - t0
        with open(os.path.join(self.logs, f"{name}.log"), "w") as f:
            f.write(f"$ {' '.join(cmd)}\n# rc={rc} wall_s={wall:.1f}\n--- stdout\n{stdout}"
                    f"\n--- stderr\n{stderr}")
        return rc, stdout, stderr, wall

    def record(self, name: str, entry: dict) -> None:
        self.res["steps"][name] = entry
        self.write()

    def write(self) -> None:
        self.res["wall_s"] = time.perf_counter() - self.t0
        self.res["summary"] = summary(self.res)
        with open(os.path.join(self.out, "device_check.json"), "w") as f:
            json.dump(common._round_floats(self.res), f, indent=1)
            f.write("\n")
        with open(os.path.join(self.out, "device_check.md"), "w") as f:
            f.write(markdown(self.res) + "\n")

    def child(self, name: str) -> None:
        timeout = self.timeout(name)
        if timeout < MIN_STEP_S:
            return self.record(name, {"ok": False, "skipped": "budget spent"})
        env = dict(self.env, DP_JAX_DEVICE_PEAKS=json.dumps(
            self.res["steps"].get("peaks", {}).get("result", {}).get("gflops", {})))
        cmd = [sys.executable, os.path.abspath(__file__), "--step", name] + \
            (["--dry-run"] if self.dry else [])
        rc, stdout, stderr, wall = self.command(name, cmd, timeout, env)
        entry = {"ok": rc == 0, "wall_s": wall}
        if rc is None:
            entry["error"] = f"timeout after {timeout:.0f} s"
        elif rc:
            entry["error"] = stderr[-1500:]
        else:
            try:
                entry["result"] = last_json(stdout)
            except ValueError as e:
                entry.update(ok=False, error=f"{e}: {stdout[-300:]}")
        if name == "env" and entry.get("result"):
            self.res["env"] = entry["result"]
        self.record(name, entry)

    def pytest(self, name: str, args: list) -> None:
        timeout = self.timeout(name)
        if timeout < MIN_STEP_S:
            return self.record(name, {"ok": False, "skipped": "budget spent"})
        junit = os.path.join(self.logs, f"{name}.junit.xml")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               f"--junitxml={junit}", *args]
        rc, stdout, stderr, wall = self.command(name, cmd, timeout)
        entry = {"ok": rc in (0, 5), "wall_s": wall, "exit_code": rc, "args": args,
                 **junit_counts(junit)}
        if rc == 5:
            entry["note"] = "no test selected"
        if rc is None:
            entry["error"] = f"timeout after {timeout:.0f} s"
        elif rc not in (0, 5):
            tail = (stdout + stderr).strip().splitlines()[-15:]
            entry["error"] = "\n".join(tail)
        self.record(name, entry)

    def suite(self, parts: list[str]) -> None:
        peak = self.res["steps"].get("peaks", {}).get("result", {}).get("gflops", {})
        env = dict(self.env)
        if peak.get("f32_default"):
            env["DP_JAX_BENCH_PEAK_GFLOPS"] = str(peak["f32_default"])
        merged = {"benchmark": "suite", "quick": True, "parts": {}, "torch": False,
                  "peak_gflops": peak.get("f32_default")}
        entry = {"ok": True, "wall_s": 0.0, "parts": parts, "result": merged}
        for part in parts:
            timeout = min(self.timeout("suite") - entry["wall_s"], self.left())
            if timeout < MIN_STEP_S:
                merged["parts"][part] = {"ok": False, "skipped": "budget spent"}
                entry["ok"] = False
                continue
            jpath = os.path.join(self.logs, f"suite_{part}.json")
            cmd = [sys.executable, os.path.join(HERE, "suite.py"), "--quick", "--no-torch",
                   "--parts", part, "--json-out", jpath, "--timeout-s", f"{timeout - 5:.0f}"]
            rc, stdout, stderr, wall = self.command(f"suite_{part}", cmd, timeout, env)
            entry["wall_s"] += wall
            try:
                with open(jpath) as f:
                    got = json.load(f)
                for k in ("backend", "malloc", "torch"):
                    merged[k] = got.get(k, merged.get(k))
                merged["parts"][part] = got["parts"][part]
            except (OSError, ValueError, KeyError):
                merged["parts"][part] = {"ok": False, "wall_s": wall, "error": (
                    f"timeout after {timeout:.0f} s" if rc is None else stderr[-1500:])}
            entry["ok"] &= bool(merged["parts"][part].get("ok"))
            self.record("suite", entry)
        merged["wall_s"] = entry["wall_s"]
        try:
            from suite_table import markdown as suite_markdown
            entry["markdown"] = suite_markdown(merged)
        except Exception as e:  # noqa: BLE001  (the table is a convenience)
            entry["markdown"] = f"(suite table failed: {e})"
        self.record("suite", entry)


def last_json(text: str):
    """The JSON object that ends ``text``."""
    from suite import last_json as _last
    return _last(text)


def junit_counts(path: str) -> dict:
    """tests / passed / failed / errors / skipped / xfailed / xpassed of a junit XML."""
    counts = dict.fromkeys(("tests", "passed", "failed", "errors", "skipped", "xfailed",
                            "xpassed"), 0)
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {"junit": "missing"}
    for case in root.iter("testcase"):
        counts["tests"] += 1
        kids = {c.tag: c for c in case}
        if "failure" in kids:
            counts["failed"] += 1
        elif "error" in kids:
            counts["errors"] += 1
        elif "skipped" in kids:
            kind = kids["skipped"].get("type", "")
            counts["xfailed" if "xfail" in kind else "skipped"] += 1
        else:
            counts["passed"] += 1
            if any("xpass" in (c.get("message") or "").lower() for c in case):
                counts["xpassed"] += 1
    return counts


def nvidia_smi() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        p = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        return p.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


# =============================================================================== outputs

def _get(d: dict, *path, default=None):
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def summary(res: dict) -> dict:
    """The headline figures, flat."""
    s = res["steps"]
    env = res.get("env", {})
    out = {
        "backend": env.get("backend"), "device": _get(env, "devices", default=[{}])[0].get("kind")
        if env.get("devices") else None,
        "jax": _get(env, "versions", "jax"), "jaxlib": _get(env, "versions", "jaxlib"),
        "peak_tflops": {k: v / 1e3 for k, v in
                        (_get(s, "peaks", "result", "gflops") or {}).items()},
        "pytest_gpu_selected": _get(s, "pytest_gpu", "tests"),
        "readiness": {k: _get(s, "readiness", k) for k in
                      ("passed", "failed", "errors", "xfailed", "xpassed")},
        "suite_parts_ok": {p: bool(r.get("ok")) for p, r in
                           (_get(s, "suite", "result", "parts") or {}).items()},
        "imp_images_per_s": _get(s, "imp", "result", "images_per_s"),
        "imp_mfu": _get(s, "imp", "result", "mfu_vs_f32_default_peak"),
        "imp_compiles_in_masked_round": _get(s, "imp", "result", "compiles_in_masked_round"),
        "dp_inner_wall_s": _get(s, "dp_inner", "result", "wall_s"),
        "dp_inner_steps": _get(s, "dp_inner", "result", "steps"),
        "steps_ok": {k: bool(v.get("ok")) for k, v in s.items()},
        "wall_s": res.get("wall_s"),
    }
    return out


def _f(x, fmt="{:.3g}") -> str:
    return "—" if x is None else fmt.format(x)


def _status(entry: dict) -> str:
    if not entry:
        return "not run"
    if entry.get("skipped"):
        return f"skipped ({entry['skipped']})"
    return "ok" if entry.get("ok") else "FAILED"


def markdown(res: dict) -> str:
    s, sm = res["steps"], summary(res)
    env = res.get("env", {})
    head = (f"Device check{' (dry run, CPU)' if res.get('dry_run') else ''}: "
            f"{sm['device'] or '?'} ({sm['backend'] or '?'}), jax {sm['jax'] or '?'} / "
            f"jaxlib {sm['jaxlib'] or '?'}, {_f(res.get('wall_s'), '{:.0f}')} s of "
            f"{res.get('budget_s'):.0f} s; CPU {_get(env, 'host', 'cpu_model') or '?'}; "
            f"XLA_FLAGS `{env.get('XLA_FLAGS') or ''}`")
    rows = ["| check | status | figure | wall s |", "| --- | --- | --- | --- |"]

    def row(name, entry, figure):
        rows.append(f"| {name} | {_status(entry)} | {figure} | "
                    f"{_f(entry.get('wall_s') if entry else None, '{:.1f}')} |")

    row("env", s.get("env"), ", ".join(f"{k} {v}" for k, v in
                                       (env.get("versions") or {}).items()) or "—")
    pk = sm["peak_tflops"]
    row("matmul peak", s.get("peaks"),
        f"bf16 {_f(pk.get('bf16'))} / TF32 {_f(pk.get('tf32'))} / f32 {_f(pk.get('f32'))} / "
        f"f32 default {_f(pk.get('f32_default'))} TFLOP/s")
    r = _get(s, "imp", "result") or {}
    row("IMP round " + (f"{r['model']} {'x'.join(map(str, r['image_shape']))}" if r else
                        "ResNet-18 w32 32x32x3"), s.get("imp"),
        f"{_f(r.get('images_per_s'))} img/s, MFU {_f(r.get('mfu_vs_f32_default_peak'), '{:.1%}')}"
        f", compile {_f(r.get('compile_s_est'), '{:.1f}')} s, "
        f"{_f(r.get('compiles_in_masked_round'), '{}')} compiles in the masked round"
        if r else "—")
    r = _get(s, "dp_inner", "result") or {}
    row(f"DP inner loop {r.get('model', '')}".strip(), s.get("dp_inner"),
        f"{r.get('epochs')} epochs x {r.get('images')} images, batch {r.get('batch')} "
        f"({r.get('steps')} steps, {r.get('loop')}): {_f(r.get('wall_s'), '{:.2f}')} s, "
        f"first call {_f(r.get('first_call_s'), '{:.1f}')} s" if r else "—")
    for name, label in (("pytest_gpu", "pytest -m gpu"), ("readiness", "readiness tests")):
        e = s.get(name) or {}
        row(label, e, f"{_f(e.get('tests'), '{}')} selected: {_f(e.get('passed'), '{}')} passed"
            f", {_f(e.get('failed'), '{}')} failed, {_f(e.get('errors'), '{}')} errors, "
            f"{_f(e.get('xfailed'), '{}')} xfailed" if e and "tests" in e else "—")
    for part, r in (_get(s, "suite", "result", "parts") or {}).items():
        row(f"suite --quick: {part}", r, _f(r.get("wall_s"), "{:.0f} s") if r.get("ok")
            else (r.get("skipped") or (r.get("error") or "")[-80:].replace("\n", " ")
                  .replace("|", "/")))
    out = [head, "", *rows]
    table = _get(s, "suite", "markdown")
    if table:
        out += ["", "Suite (benchmarks/suite_table.py):", "", table]
    return "\n".join(out)


# =============================================================================== main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "device_check_out")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU")
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall-time budget of all steps (default 450; 240 with --dry-run)")
    p.add_argument("--suite-parts", default=None,
                   help=f"suite parts, in order (default {SUITE_PARTS}; 'peak' with --dry-run)")
    p.add_argument("--skip", default="", help=f"steps to skip, comma-separated: {STEPS}")
    p.add_argument("--step", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.step:
        if args.dry_run:  # repeated dry runs load their programs (dp_jax's persistent cache)
            from dp_jax.system import compile_cache
            compile_cache.enable()
        print(json.dumps(CHILD_STEPS[args.step](args.dry_run)))
        return 0
    skip = {s for s in args.skip.split(",") if s}
    unknown = skip - set(STEPS)
    if unknown:
        p.error(f"--skip: unknown steps {sorted(unknown)}; allowed: {','.join(STEPS)}")
    budget = args.budget_s or (240.0 if args.dry_run else 450.0)
    run = Run(os.path.abspath(args.out), args.dry_run, budget)
    run.res["nvidia_smi"] = nvidia_smi()
    run.write()
    for step in STEPS:
        if step in skip:
            run.record(step, {"ok": True, "skipped": "--skip"})
        elif step in CHILD_STEPS:
            run.child(step)
        elif step == "pytest_gpu":
            # The suite's own marker selection; --dry-run collects one directory only.
            run.pytest(step, ["-m", "gpu"] + (["tests/training"] if args.dry_run else []))
        elif step == "readiness":
            run.pytest(step, ["tests/training/test_gpu_readiness.py"]
                       + (["-k", "donates or reads"] if args.dry_run else []))
        elif step == "suite":
            parts = args.suite_parts or ("peak" if args.dry_run else SUITE_PARTS)
            run.suite([q for q in parts.split(",") if q])
    run.write()
    print(markdown(run.res))
    failed = [k for k, v in run.res["steps"].items() if not v.get("ok")]
    common.log(f"[device_check] wrote {run.out}/device_check.json and .md in "
               f"{run.res['wall_s']:.0f} s" + (f"; not ok: {', '.join(failed)}" if failed else ""))
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
