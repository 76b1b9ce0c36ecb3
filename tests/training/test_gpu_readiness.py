"""GPU readiness, checked on the CPU: the hot loops neither retrace nor copy implicitly.

For each hot loop -- one epoch of :class:`dp_jax.training.trainer.Trainer` (both loop forms),
DP's inner loop (``small_set.setup_inner_train``, both forms), one MTT iteration (the matcher in
both forms and the whole ``mtt.build_method`` step), a gradient-matching and a
distribution-matching step, and the instability alpha sweep (``FamilyEvaluator`` /
``instability.analyze_copies``) -- a warm-up call compiles everything, then a second call with
new data of the same shapes (another round's mask, another seed) must

  * trace and compile nothing (a counter on JAX's own trace and compile events, so every
    program counts, eager ops included; ``chex.assert_max_traces`` where a program takes a
    wrapper);
  * run under ``jax.transfer_guard("disallow")``: no implicit host<->device copy (explicit
    ``jax.device_put``/``jax.device_get`` are allowed). On the CPU backend only host-to-device
    transfers are guarded (CPU arrays live in host memory); device-to-host reads are counted
    by :func:`host_reads` instead.

Also: the real-data step and the inner loop donate their state buffers (seen in the lowered
and the compiled program, and at run time), and an epoch reads from the device only at its
logging point (one explicit ``jax.device_get`` per epoch).

Every hot loop passes: loop indices reach the programs as device values (the training step's
own counter, or scalars copied once and explicitly), eager ops with host constants were moved
into the jitted programs, and the one remaining per-call read (where a training state stands)
is an explicit ``jax.device_get``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import re
import sys
import types

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dp_jax import masks
from dp_jax.analysis import family, instability
from dp_jax.distill import common, dm, gm, mtt
from dp_jax.distill.experts import Trajectories
from dp_jax.models import create_model, init_variables
from dp_jax.training import small_set, trainer as train
from dp_jax.training.optimizers import make_optimizer
from dp_jax.training.settings import DPSettings, TrainSettings

from conftest import ROOT, load_config_module

TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
GuardError = getattr(jax.errors, "JaxRuntimeError", Exception)


# ------------------------------------------------------------------------------- instruments

@contextlib.contextmanager
def count_traces():
    """Counts JAX's trace and backend-compile events inside the block (every jitted program
    and every eager op that is not yet cached)."""
    counts = collections.Counter()

    def listener(event, duration_secs, **kwargs):
        if event in (TRACE_EVENT, COMPILE_EVENT):
            counts["traces" if event == TRACE_EVENT else "compiles"] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield counts
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


@dataclasses.dataclass(frozen=True)
class Read:
    """One point where the host waits for the device to hand back values: where the library
    asked, and whether it was an explicit ``jax.device_get`` (one read per call, however
    many arrays it fetches)."""
    site: str        # "dp_jax/training/outputs.py:check_finite"
    line: int
    explicit: bool


def _read_site(explicit: bool) -> Read:
    """The first frame of dp_jax (or of a test) above the read, skipping jax and NumPy."""
    frame = sys._getframe(2)
    while frame is not None:
        code = frame.f_code
        path = code.co_filename.replace(os.sep, "/")
        ours = code.co_filename == __file__ and code.co_name in ("fget", "device_get")
        if not ours and "/jax/" not in path and "/numpy/" not in path and (
                "/dp_jax/" in path or "/tests/" in path):
            rel = os.path.relpath(code.co_filename, ROOT).replace(os.sep, "/")
            return Read(site=f"{rel}:{code.co_name}", line=frame.f_lineno, explicit=explicit)
        frame = frame.f_back
    return Read(site="?", line=0, explicit=explicit)


@contextlib.contextmanager
def host_reads():
    """Records every read of a device array's value on the host (``np.asarray``, ``float``,
    ``int``, ``jax.device_get``, printing): each one makes the host wait for the device. One
    ``jax.device_get`` of a pytree (its arrays copied in parallel) is one read."""
    from jax._src.array import ArrayImpl
    original, original_get = ArrayImpl.__dict__["_value"], jax.device_get
    reads: list[Read] = []
    get = {"active": False, "counted": False}

    def fget(self):
        if self._npy_value is None and not get["counted"]:  # this read waits for the device
            reads.append(_read_site(explicit=get["active"]))
            get["counted"] = get["active"]
        return original.fget(self)

    def device_get(tree):
        get.update(active=True, counted=False)
        try:
            return original_get(tree)
        finally:
            get.update(active=False, counted=False)

    ArrayImpl._value = property(fget)
    jax.device_get = device_get
    try:
        yield reads
    finally:
        ArrayImpl._value = original
        jax.device_get = original_get


def block(tree):
    return jax.block_until_ready(tree)


def assert_no_retrace(workload):
    """The second (and third) call with new data of the same shapes traces nothing."""
    for i in (1, 2):
        args = workload.prepare(i)
        with count_traces() as counts:
            block(workload.hot(*args))
        assert counts["traces"] == 0 and counts["compiles"] == 0, (
            f"{workload.name}: call {i} with new data of the same shapes traced "
            f"{counts['traces']} and compiled {counts['compiles']} programs")


def run_guarded(workload, i=3):
    """The hot loop under transfer_guard('disallow') (implicit transfers raise)."""
    args = workload.prepare(i)
    with jax.transfer_guard("disallow"):
        out = workload.hot(*args)
        block(out)
    return out


# ------------------------------------------------------------------------------- workloads
# A workload: prepare(i) builds call i's inputs (i = 0 is the warm-up; new data, mask and seed
# per i, same shapes) outside the guard; hot(*args) is the hot loop itself. Built and warmed
# once per module.

@dataclasses.dataclass
class Workload:
    name: str
    prepare: callable
    hot: callable
    extra: dict = dataclasses.field(default_factory=dict)


def _random_mask(params, i, fraction=0.3):
    return masks.prune(masks.random_scores(params, jax.random.key(1000 + i)),
                       masks.ones_like(params), fraction)


def _trainer_workload(loop: str, epochs: int = 2) -> Workload:
    """One round's training: ConvNet (BatchNorm, so the state has batch statistics), 48
    images of 6x6x1, batch 16 (3 steps per epoch), the config's optimiser."""
    model = create_model(ml_collections.ConfigDict(
        {"name": "convnet", "width": 4, "depth": 1, "norm": "batch"}), num_classes=3)
    shape, n, B = (6, 6, 1), 48, 16
    v = init_variables(model, jax.random.key(0), shape)
    cfg = TrainSettings.from_config(lr=0.05, momentum=0.9, weight_decay=5e-4,
                                    schedule="multistep", decay_at=(0.5,))
    num_steps = epochs * (n // B)
    tx = make_optimizer(cfg, num_steps)
    tr = train.Trainer(model, tx, batch_size=B, num_train=n, loop=loop)
    logged = []

    def prepare(i):
        x = jax.random.normal(jax.random.key(100 + i), (n,) + shape)
        y = jax.random.randint(jax.random.key(200 + i), (n,), 0, 3)
        state = train.create_state(v, _random_mask(v["params"], i), tx)  # round i's mask
        return state, x, y, jax.random.key(300 + i)                       # seed i's data order

    def hot(state, x, y, key):  # on_epoch: the logging point (a metrics row per epoch)
        return tr.train(state, x, y, key, num_steps,
                        on_epoch=lambda e, m: logged.append((e, m["loss"])))

    w = Workload(f"Trainer[{loop}]", prepare, hot,
                 dict(trainer=tr, epochs=epochs, num_steps=num_steps))
    block(hot(*prepare(0)))
    return w


def _inner_workload(loop: str) -> Workload:
    """DP's inner loop through ``setup_inner_train`` (the code path of a pruning round): LeNet
    on a 12-image set, 2 inner seeds, 2 epochs of 3 steps."""
    model = create_model(ml_collections.ConfigDict({"name": "lenet_300_100"}), num_classes=3)
    shape = (6, 6, 1)
    init_fn = jax.jit(lambda k: init_variables(model, k, shape))
    setup = types.SimpleNamespace(model=model, image_shape=shape, num_classes=3, init_fn=init_fn,
                                  trainer=types.SimpleNamespace(compute_dtype="float32"))
    dp_cfg = DPSettings.from_config(epochs=2, batch_size=4, loop=loop, augment="none",
                                    inner_seeds=2, decay_at=(0.5,))
    fn = small_set.setup_inner_train(setup, dp_cfg, lr=0.05, n=12)
    v = init_fn(jax.random.key(0))

    def prepare(i):
        x = jax.random.normal(jax.random.key(10 + i), (12,) + shape)
        y = jnp.arange(12, dtype=jnp.int32) % 3
        return v, _random_mask(v["params"], i), x, y, jax.random.split(jax.random.key(20 + i), 2)

    w = Workload(f"inner loop[{loop}]", prepare, fn, dict(fn=fn))
    block(fn(*prepare(0)))
    return w


def _matcher_workload(loop: str) -> Workload:
    """The MTT loss and its exact gradient (memory 'unroll', the config's default), LeNet on
    six 4x4 images, 4 student steps."""
    model = create_model(ml_collections.ConfigDict({"name": "lenet_300_100"}), num_classes=3)
    p0 = init_variables(model, jax.random.key(0), (4, 4, 1))["params"]
    matcher = mtt.TrajectoryMatcher(model, num_steps=4, batch_size=3, memory="unroll", loop=loop)
    y = jnp.arange(6, dtype=jnp.int32) % 3

    def prepare(i):
        x = jax.random.normal(jax.random.key(40 + i), (6, 4, 4, 1))
        p1 = jax.tree.map(lambda a: a * (1.05 + 0.01 * i) + 0.01, p0)
        return (x, y, jnp.log(jnp.float32(0.05)), p0, p1, _random_mask(p0, i),
                jax.random.key(50 + i))

    w = Workload(f"MTT matcher[{loop}]", prepare, matcher, dict(matcher=matcher))
    block(matcher(*prepare(0)))
    return w


def _mtt_iteration_workload() -> Workload:
    """One iteration of ``mtt.build_method``'s step (expert and start epoch drawn, the student
    unrolled, the images and the step size updated), from a hand-made expert buffer."""
    c = load_config_module("distill_fashion_mnist").get_config("lenet,smoke")
    c.distill.update(dict(ipc=1, factor=1, syn_steps=3, batch_syn=3, dsa=False,
                          memory="remat", loop="python", max_start_epoch=2, expert_epochs=1))
    shape, classes = (4, 4, 1), 3
    model = create_model(c.model, num_classes=classes)
    like = init_variables(model, jax.random.key(0), shape)["params"]
    rng = np.random.default_rng(0)
    flat = {masks.path_str(p): np.asarray(a)
            for p, a in jax.tree_util.tree_flatten_with_path(like)[0]}
    params = {k: (a[None, None] + np.cumsum(0.01 * rng.standard_normal((2, 4) + a.shape), 1))
              .astype(np.float32) for k, a in flat.items()}   # 2 experts x epochs 0..3
    traj = Trajectories(params=params, batch_stats={}, like=like, like_bn={})
    x = rng.standard_normal((30,) + shape).astype(np.float32)
    dataset = types.SimpleNamespace(x_train=x, y_train=np.arange(30) % classes,
                                    num_classes=classes, image_shape=shape)
    method = mtt.build_method(c, dataset, traj)

    def prepare(i):
        return jax.tree.map(jnp.copy, method.state), i

    def hot(state, it):
        return method.step(state, it)

    w = Workload("MTT iteration", prepare, hot, dict(method=method))
    block(hot(*prepare(0)))
    return w


def _matching_workload(kind: str) -> Workload:
    """One iteration of gradient matching (2 outer loops, 2 network steps on real data) or
    distribution matching; every jitted piece wrapped in ``chex.assert_max_traces(n=1)``."""
    model = create_model(ml_collections.ConfigDict({"name": "lenet_300_100"}), num_classes=3)
    shape = (8, 8, 1)
    x = jax.random.normal(jax.random.key(0), (15,) + shape)
    data = common.real_data(np.asarray(x), np.arange(15) % 3, 3)
    ctx = common.MatchData(data=data, labels=jnp.arange(3, dtype=jnp.int32),
                           mask=common.dense_mask(model, shape))
    from dp_jax.config.defaults import distill_defaults
    d = distill_defaults()
    d.update(dict(ipc=1, factor=2, dsa=False, gm_batch_real=4,
                  dm_batch_real=4, gm_outer_loops=2, gm_inner_loops=2, gm_batch_net=4,
                  gm_net_train="real"))
    wrap = lambda f: chex.assert_max_traces(f, n=1)  # noqa: E731
    mod = gm if kind == "gm" else dm
    cls = gm.GradientMatching if kind == "gm" else dm.DistributionMatching
    prog = cls(model, mod.Settings.from_config(d, data=data, num_stored=3, image_shape=shape),
               wrap=wrap)

    def prepare(i):
        images = jax.random.normal(jax.random.key(60 + i), (3,) + shape)
        return {"images": images, "opt": prog.tx_img.init(images)}, i, jax.random.key(70 + i)

    def hot(state, it, key):
        return prog.step(state, it, key=key, ctx=ctx)

    w = Workload(f"{kind} step", prepare, hot, dict(prog=prog))
    block(hot(*prepare(0)))
    return w


class _TinyMLP(nn.Module):
    """flatten -> Dense -> tanh -> BatchNorm -> Dense (as tests/analysis/test_analysis.py)."""

    @nn.compact
    def __call__(self, x, train=False):
        x = x.reshape((x.shape[0], -1))
        x = jnp.tanh(nn.Dense(6, name="fc1")(x))
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(x)
        return nn.Dense(3, name="head")(x)


def _alpha_workload(full: bool) -> Workload:
    """The instability alpha sweep of two trained copies: ``FamilyEvaluator.evaluate`` (the
    vmapped sweep itself, test batches padded beforehand), or all of ``analyze_copies``
    (pairs, barriers, distances, layer-wise sweeps, both BatchNorm modes)."""
    model = _TinyMLP()
    x = jax.random.normal(jax.random.key(0), (40, 2, 2, 1))
    y = jax.random.randint(jax.random.key(1), (40,), 0, 3)
    ev = family.FamilyEvaluator(model, eval_batch_size=16)
    batches = family.pad_batches(x, y, ev.eval_batch_size)
    bn_batches = family.bn_batches(x, jax.random.key(2), num_batches=2, batch_size=16)
    alphas = np.linspace(0.0, 1.0, 5)

    def copies_of(i):
        out = []
        for c in range(2):
            v = model.init(jax.random.key(10 * i + c), x)
            out.append({"params": v["params"], "batch_stats": v["batch_stats"]})
        return out

    like = copies_of(0)[0]
    sel = {"params": family.ones_selector(like["params"]),
           "batch_stats": family.ones_selector(like["batch_stats"])}
    coeffs = jax.device_put(instability.interpolation_coeffs(alphas))  # explicit

    if full:
        def prepare(i):
            return copies_of(i), _random_mask(like["params"], i)

        def hot(copies, mask):
            return instability.analyze_copies(ev, copies, mask, x, y, alphas=alphas,
                                              bn_modes=("interpolate", "recompute"),
                                              bn_batches=bn_batches, batches=batches)
    else:
        def prepare(i):
            a, b = copies_of(i)
            return family.stack([a, b]), _random_mask(like["params"], i)

        def hot(anchors, mask):
            return ev.evaluate(anchors, coeffs, mask, x, y, sel=sel, bn_mode="recompute",
                               bn_batches=bn_batches, batches=batches)

    w = Workload("analyze_copies" if full else "FamilyEvaluator.evaluate", prepare, hot)
    block(hot(*prepare(0)))
    return w


FACTORIES = {
    "trainer_scan": lambda: _trainer_workload("scan"),
    "trainer_python": lambda: _trainer_workload("python"),
    "inner_scan": lambda: _inner_workload("scan"),
    "inner_python": lambda: _inner_workload("python"),
    "mtt_matcher_scan": lambda: _matcher_workload("scan"),
    "mtt_matcher_python": lambda: _matcher_workload("python"),
    "mtt_iteration": _mtt_iteration_workload,
    "gm_step": lambda: _matching_workload("gm"),
    "dm_step": lambda: _matching_workload("dm"),
    "alpha_sweep": lambda: _alpha_workload(False),
    "analyze_copies": lambda: _alpha_workload(True),
}


@pytest.fixture(scope="module")
def workloads():
    built = {}

    def get(name):
        if name not in built:
            built[name] = FACTORIES[name]()
        return built[name]
    return get


# ------------------------------------------------------------------------------- no retrace

@pytest.mark.parametrize("name", list(FACTORIES))
def test_second_call_with_new_data_neither_traces_nor_compiles(workloads, name):
    assert_no_retrace(workloads(name))


# ------------------------------------------------------------------------------- transfer guard

GUARD_CASES = [
    "trainer_scan",
    "trainer_python",
    "inner_scan",
    "inner_python",
    "mtt_matcher_scan",
    "mtt_matcher_python",
    "mtt_iteration",
    "gm_step",
    "dm_step",
    "alpha_sweep",
    "analyze_copies",
]


@pytest.mark.parametrize("name", GUARD_CASES)
def test_hot_loop_makes_no_implicit_transfer(workloads, name):
    run_guarded(workloads(name))


# ------------------------------------------------------------------------------- donation

def _aliased_inputs(lowered) -> int:
    """Inputs the lowered program marks as donated (aliased to an output or buffer donors)."""
    text = lowered.as_text()
    return text.count("tf.aliasing_output") + text.count("jax.buffer_donor")


def _compiled_aliases(compiled) -> int:
    header = next((line for line in compiled.as_text().splitlines()
                   if "input_output_alias" in line), "")
    return len(re.findall(r"-alias\)", header))


@pytest.mark.parametrize("loop", ["scan", "python"])
def test_real_data_step_donates_the_state(workloads, loop):
    w = workloads(f"trainer_{loop}")
    tr = w.extra["trainer"]
    state, x, y, key = w.prepare(5)
    n_leaves = len(jax.tree.leaves(state))
    perm_fn, segment_fn, step_fn = tr._programs[False]
    perm = perm_fn(key, state.step)
    if loop == "scan":
        lowered = segment_fn.lower(state, x, y, perm, key, length=tr.steps_per_epoch)
    else:
        lowered = step_fn.lower(state, x, y, perm, key)
    assert _aliased_inputs(lowered) == n_leaves
    assert _compiled_aliases(lowered.compile()) == n_leaves
    # The streamed-batch step as well.
    xb, yb = x[:tr.batch_size], y[:tr.batch_size]
    assert _aliased_inputs(tr._step_batch.lower(state, xb, yb, key)) == n_leaves
    # At run time: the caller's state buffers are consumed (updated in place).
    block(w.hot(state, x, y, key))
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(state))


def _closure(fn, name):
    return dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__)))[name]


def test_inner_loop_donates_its_state(workloads):
    # Python form: one jitted chunk per call, the vmapped state donated between calls.
    w = workloads("inner_python")
    run = _closure(w.extra["fn"], "run")
    program = _closure(run, "program")
    init = _closure(run, "init")
    v, mask, x, y, keys = w.prepare(6)
    state = init(v, mask, keys)
    lowered = program.lower(state, x, y, keys)
    n_leaves = len(jax.tree.leaves(state))
    assert _aliased_inputs(lowered) == n_leaves
    assert _compiled_aliases(lowered.compile()) == n_leaves
    block(program(state, x, y, keys))
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(state))
    # Scan form: the state is created and carried inside one program (nothing to donate);
    # its inputs -- the round's weights and mask, reused by the caller -- must not be donated.
    w = workloads("inner_scan")
    v, mask, x, y, keys = w.prepare(6)
    assert _aliased_inputs(w.extra["fn"].lower(v, mask, x, y, keys)) == 0


# ------------------------------------------------------------------------------- host syncs

@pytest.mark.parametrize("loop", ["scan", "python"])
def test_an_epoch_reads_from_the_device_only_at_its_logging_point(workloads, loop):
    w = workloads(f"trainer_{loop}")
    epochs = w.extra["epochs"]
    args = w.prepare(7)
    with host_reads() as reads:
        block(w.hot(*args))
    logging = [r for r in reads if r.site.startswith("dp_jax/training/outputs.py:check_finite")]
    assert len(logging) == epochs and all(r.explicit for r in logging), reads
    # Besides the per-epoch log, one explicit read on entry: where the state stands.
    others = [r for r in reads if r not in logging]
    assert [r.site for r in others] == ["dp_jax/training/trainer.py:_train"], others
    # Without a logger an epoch never waits for the device (only the entry read remains).
    tr, (state, x, y, key) = w.extra["trainer"], w.prepare(8)
    with host_reads() as reads:
        block(tr.train(state, x, y, key, w.extra["num_steps"]))
    assert [r.site for r in reads] == ["dp_jax/training/trainer.py:_train"], reads


def test_training_never_reads_the_device_implicitly(workloads):
    w = workloads("trainer_scan")
    args = w.prepare(9)
    with host_reads() as reads:
        block(w.hot(*args))
    assert all(r.explicit for r in reads), [r for r in reads if not r.explicit]


@pytest.mark.parametrize("loop", ["scan", "python"])
def test_inner_loop_never_reads_from_the_device(workloads, loop):
    w = workloads(f"inner_{loop}")
    args = w.prepare(10)
    with host_reads() as reads:
        out = w.hot(*args)
    assert reads == []
    block(out)
