"""Matching Training Trajectories: the unrolled student, the matching loss and its exact gradient.

The student starts at an expert's parameters at epoch t, ``theta_0 = mask * theta*_t``, and
takes N plain SGD steps on minibatches of the synthetic set,

    theta_{k+1} = theta_k - exp(log_lr) * mask * grad CE(theta_k; augment(x[idx_k]), y[idx_k]),

and the loss is ``||mask*(theta_N - theta*_{t+M})||^2 / ||mask*(theta*_t - theta*_{t+M})||^2``
(both sums over unpruned coordinates, so a masked student is compared on the weights it can
move). Its gradient with respect to the synthetic images and the log step size flows through
all N steps (second derivatives of the network).

Minibatches follow MTT: passes over a fresh permutation of the synthetic set in chunks of
``batch_size`` (the last partial chunk of a pass is dropped so shapes stay static), drawn by
:func:`dp_jax.training.small_set.batch_at` like every small-set training here; the augmentation key is
``fold_in(fold_in(key, 1), k)``: a step depends only on (key, k).

Normalisation: the MTT ConvNet uses instance norm (no running statistics), which is what the
student needs. For BatchNorm models the student runs in train mode on each synthetic minibatch
(batch statistics, like the reference's functional student) and the running averages are
discarded; only ``params`` are matched.

Memory modes (all give the same gradient; tests check them against each other and against
finite differences):

  ``unroll``    plain reverse mode: every step's intermediate values are kept, memory grows
                with N by a full step's activations per step.
  ``remat``     ``jax.checkpoint`` per step: only the N parameter vectors are kept; each step's
                forward is recomputed in the backward pass (~1.3-1.5x the time of ``unroll``).
  ``constant``  two-level checkpointing: parameters are kept only every C ~ sqrt(N) steps and
                each segment is replayed during the backward pass, so memory is one step's
                activations plus ~2 sqrt(N) parameter vectors. Exact, like ``remat``.

Why not TESLA's constant-memory formula: TESLA writes theta_N = theta_t - lr * sum_i g_i and
back-propagates ``(theta_N - theta*)^T g_i`` into batch i step by step. Done that way each
``g_i`` is differentiated with theta_{t+i} held fixed, which drops the terms that carry batch
j < i's influence through theta_{t+i} (products of Hessians with earlier updates). Keeping those
terms needs theta_{t+i} in reverse order, and plain SGD cannot be run backwards exactly, so an
exact gradient needs either the stored parameters (``remat``) or recomputation from
checkpoints (``constant``). Parameter vectors are small next to activations, so both keep the
measured memory flat in N.

Two loop forms run the same steps: ``scan`` (one compiled program per iteration, for MLPs and
accelerators) and ``python`` (jitted single steps dispatched from Python; XLA:CPU runs convolution
steps inside a rolled or chunked ``lax.scan`` 10-30x slower than as separate programs). With
``python``, ``unroll`` keeps each step's VJP residuals on the device between the two passes.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dp_jax import masks as masks_lib
from dp_jax import rng
from dp_jax.training import small_set
from dp_jax.training import precision
from dp_jax.data.augment import make_augment
from dp_jax.distill import common, synthetic
from dp_jax.distill.experts import Trajectories, distill_key
from dp_jax.models import create_model
from dp_jax.models.convs import fast_convs

PyTree = Any
MEMORY_MODES = ("unroll", "remat", "constant")
LOOPS = ("auto", "scan", "python")


def sq_distance(a: PyTree, b: PyTree, mask: PyTree) -> jax.Array:
    """``sum(mask * (a - b)**2)`` over every leaf, in float32 or wider."""
    terms = jax.tree.map(lambda u, v, m: jnp.sum(jnp.where(m, (u - v) ** 2, 0.0)), a, b, mask)
    return sum(jax.tree.leaves(terms))


def resolve_loop(loop: str, params: PyTree) -> str:
    """``'auto'`` -> ``'python'`` for conv nets on CPU, else ``'scan'``."""
    if loop not in LOOPS:
        raise ValueError(f"distill.loop must be one of {LOOPS}, got {loop!r}")
    if loop != "auto":
        return loop
    has_conv = any(jnp.ndim(k) == 4 for k in masks_lib.prunable_leaves(params).values())
    return "python" if (has_conv and jax.default_backend() == "cpu") else "scan"


def segment_length(num_steps: int) -> int:
    """Checkpoint spacing of the ``constant`` mode: ceil(sqrt(N))."""
    return max(1, math.isqrt(max(num_steps - 1, 0)) + 1)


def make_student_step(model, *, batch_size: int, augment: Optional[Callable],
                      compute_dtype: str = "float32") -> Callable:
    """One student SGD step ``step(theta, x, y, log_lr, mask, key, k, bn) -> theta'`` (pure).

    ``x, y`` are the whole synthetic set; the step picks its minibatch and augmentation from
    ``(key, k)``. ``bn`` is the BatchNorm ``batch_stats`` collection (``{}`` if none).
    ``compute_dtype``: the forward/backward dtype (``train.compute_dtype``); the parameters
    and the update stay float32.
    """
    cast = functools.partial(precision.to_compute, compute_dtype=compute_dtype)

    def step(theta, x, y, log_lr, mask, key, k, bn):
        idx = small_set.batch_at(key, k, x.shape[0], batch_size)
        xb, yb = x[idx], y[idx]
        if augment is not None:
            xb = augment(jax.random.fold_in(jax.random.fold_in(key, 1), k), xb)

        def ce(th):
            if bn:
                logits, _ = model.apply(cast({"params": th, "batch_stats": bn}), cast(xb),
                                        train=True, mutable=["batch_stats"])
            else:
                logits = model.apply(cast({"params": th}), cast(xb), train=True)
            return optax.softmax_cross_entropy_with_integer_labels(
                precision.from_compute(logits, compute_dtype), yb).mean()

        g = jax.grad(ce)(theta)
        lr = jnp.exp(log_lr)
        return jax.tree.map(lambda t, gi, m: jnp.where(m, t - lr * gi, t), theta, g, mask)
    return step


class TrajectoryMatcher:
    """The MTT loss and its gradient for one static configuration; build once, call per iteration.

    Args:
      model: the Flax student (the experts' architecture).
      num_steps: N student steps.
      batch_size: synthetic minibatch size (clipped to the set size).
      augment: ``augment(key, x) -> x`` (DSA) or None.
      memory: one of ``MEMORY_MODES``.
      loop: ``'scan'`` or ``'python'`` (resolve ``'auto'`` with :func:`resolve_loop`).
      unroll: ``lax.scan`` unroll factor of the ``scan`` loop.
      fast_conv: trace the student with :func:`dp_jax.models.convs.fast_convs`.
      compute_dtype: the student's forward/backward dtype (``train.compute_dtype``).
    """

    def __init__(self, model, *, num_steps: int, batch_size: int,
                 augment: Optional[Callable] = None, memory: str = "remat",
                 loop: str = "python", unroll: int = 1, fast_conv: bool = True,
                 compute_dtype: str = "float32"):
        if memory not in MEMORY_MODES:
            raise ValueError(f"distill.memory must be one of {MEMORY_MODES}, got {memory!r}")
        if loop not in ("scan", "python"):
            raise ValueError(f"TrajectoryMatcher loop must be 'scan' or 'python', got {loop!r}")
        if num_steps < 1:
            raise ValueError(f"distill.syn_steps must be >= 1, got {num_steps}")
        self.num_steps, self.memory, self.loop = int(num_steps), memory, loop
        self.unroll = max(int(unroll), 1)
        self.fast_conv = bool(fast_conv)
        self._step = make_student_step(model, batch_size=batch_size, augment=augment,
                                       compute_dtype=compute_dtype)
        if loop == "scan":
            self._vg = jax.jit(jax.value_and_grad(self._scan_loss, argnums=(0, 1)))
        else:
            step = self._step
            self._fwd = jax.jit(step)

            def fwd_res(th, x, y, log_lr, mask, key, k, bn):
                return jax.vjp(lambda t, xx, lr: step(t, xx, y, lr, mask, key, k, bn),
                               th, x, log_lr)

            def bwd(th, x, y, log_lr, mask, key, k, bn, lam, gx, glr):
                _, vjp = fwd_res(th, x, y, log_lr, mask, key, k, bn)
                dth, dx, dlr = vjp(lam)
                return dth, gx + dx, glr + dlr

            def bwd_res(vjp, lam, gx, glr):
                dth, dx, dlr = vjp(lam)
                return dth, gx + dx, glr + dlr

            def final(th, start, target, mask, x, log_lr):
                def loss(t):
                    return sq_distance(t, target, mask) / _denominator(start, target, mask)
                # The gradients' accumulators start here, on the device (no eager zeros).
                return (*jax.value_and_grad(loss)(th), jnp.zeros_like(x),
                        jnp.zeros_like(log_lr))

            self._fwd_res = jax.jit(fwd_res)
            self._bwd = jax.jit(bwd, donate_argnums=(8, 9, 10))
            self._bwd_res = jax.jit(bwd_res, donate_argnums=(1, 2, 3))
            self._final = jax.jit(final)
            self._start = jax.jit(masks_lib.apply)
            # The step indices, copied to the device once (explicitly), not per call.
            self._ks = [jax.device_put(np.int32(k)) for k in range(self.num_steps)]

    # ---------------------------------------------------------------- scan form
    def _scan_loss(self, x, log_lr, y, start, target, mask, key, bn):
        theta0 = masks_lib.apply(start, mask)

        def body(th, k):
            return self._step(th, x, y, log_lr, mask, key, k, bn), None

        n = self.num_steps
        if self.memory == "unroll":
            th, _ = jax.lax.scan(body, theta0, jnp.arange(n), unroll=self.unroll)
        elif self.memory == "remat":
            th, _ = jax.lax.scan(jax.checkpoint(body), theta0, jnp.arange(n), unroll=self.unroll)
        else:
            c = segment_length(n)
            q, r = divmod(n, c)
            inner = jax.checkpoint(body)

            @jax.checkpoint
            def segment(th, ks):
                return jax.lax.scan(inner, th, ks, unroll=self.unroll)[0], None

            th, _ = jax.lax.scan(segment, theta0, jnp.arange(q * c).reshape(q, c))
            if r:
                th, _ = jax.lax.scan(inner, th, q * c + jnp.arange(r))
        return sq_distance(th, target, mask) / _denominator(start, target, mask)

    # ---------------------------------------------------------------- python form
    def _python(self, x, log_lr, y, start, target, mask, key, bn):
        n, ks = self.num_steps, self._ks
        th = self._start(start, mask)
        saved = {}
        if self.memory == "unroll":
            vjps = []
            for k in range(n):
                th, vjp = self._fwd_res(th, x, y, log_lr, mask, key, ks[k], bn)
                vjps.append(vjp)
        else:
            c = segment_length(n) if self.memory == "constant" else 1
            for k in range(n):
                if k % c == 0:
                    saved[k] = th
                th = self._fwd(th, x, y, log_lr, mask, key, ks[k], bn)
        loss, lam, gx, glr = self._final(th, start, target, mask, x, log_lr)
        if self.memory == "unroll":
            for k in reversed(range(n)):
                lam, gx, glr = self._bwd_res(vjps.pop(), lam, gx, glr)
        elif self.memory == "remat":
            for k in reversed(range(n)):
                lam, gx, glr = self._bwd(saved.pop(k), x, y, log_lr, mask, key, ks[k], bn,
                                         lam, gx, glr)
        else:
            c = segment_length(n)
            for s in reversed(range(0, n, c)):
                seg = [saved.pop(s)]
                for k in range(s, min(s + c, n) - 1):  # replay the segment from its checkpoint
                    seg.append(self._fwd(seg[-1], x, y, log_lr, mask, key, ks[k], bn))
                for k in reversed(range(s, min(s + c, n))):
                    lam, gx, glr = self._bwd(seg.pop(), x, y, log_lr, mask, key, ks[k], bn,
                                             lam, gx, glr)
        return loss, gx, glr

    def __call__(self, x: jax.Array, y: jax.Array, log_lr: jax.Array, start: PyTree,
                 target: PyTree, mask: PyTree, key: jax.Array, bn: Optional[PyTree] = None):
        """Loss and gradients ``(loss, d loss/d x, d loss/d log_lr)``.

        Args:
          x, y: the (decoded) synthetic training set, (n, H, W, C) float32 and (n,) int32.
          log_lr: scalar log step size.
          start, target: expert parameters at epochs t and t + M (params pytrees).
          mask: boolean params-shaped mask (all True for a dense student).
          key: this iteration's key (minibatches and augmentation).
          bn: BatchNorm statistics for BatchNorm models (ignored otherwise).
        """
        bn = bn or {}
        log_lr = jnp.asarray(log_lr)
        with fast_convs(self.fast_conv):
            if self.loop == "scan":
                loss, (gx, glr) = self._vg(x, log_lr, y, start, target, mask, key, bn)
                return loss, gx, glr
            return self._python(x, log_lr, y, start, target, mask, key, bn)


def _denominator(start, target, mask):
    # Guards a start equal to its target (a degenerate buffer) against division by zero.
    return jnp.maximum(sq_distance(start, target, mask), 1e-12)


def matching_loss(model, x, y, log_lr, start, target, mask, key, *, num_steps: int,
                  batch_size: int, augment: Optional[Callable] = None, bn=None) -> jax.Array:
    """The MTT loss by a plain Python unroll (reference for tests; differentiable, not jitted)."""
    step = make_student_step(model, batch_size=batch_size, augment=augment)
    th = masks_lib.apply(start, mask)
    for k in range(num_steps):
        th = step(th, x, y, log_lr, mask, key, jnp.int32(k), bn or {})
    return sq_distance(th, target, mask) / _denominator(start, target, mask)


@functools.partial(jax.jit, static_argnames=("tx_img", "tx_lr"))
def apply_updates(images, log_lr, opt_img, opt_lr, g_images, g_log_lr, *, tx_img, tx_lr):
    """One optimiser step on the images and the log step size (pure; jitted once per optimiser)."""
    u_img, opt_img = tx_img.update(g_images, opt_img, images)
    u_lr, opt_lr = tx_lr.update(g_log_lr, opt_lr, log_lr)
    return (optax.apply_updates(images, u_img), optax.apply_updates(log_lr, u_lr),
            opt_img, opt_lr)


# ------------------------------------------------------------------ the method the loop runs

_norm = jax.jit(optax.tree.norm)


class _Picks:
    """Iteration ``it``'s expert, start epoch and student key (see :func:`build_method`).

    The host needs the expert and the epoch to fetch them from the buffer; they are drawn for
    ``BLOCK`` iterations in one program and read back once, so an iteration never waits for
    the device before it can start (a per-iteration read would stall an accelerator).
    """
    BLOCK = 256

    def __init__(self, key: jax.Array, num_experts: int, max_start_epoch: int):
        def draw(it):
            k = jax.random.fold_in(key, it)
            return (jax.random.randint(jax.random.fold_in(k, 0), (), 0, num_experts),
                    jax.random.randint(jax.random.fold_in(k, 1), (), 0, max_start_epoch))

        self._draw = jax.jit(jax.vmap(draw))
        self._key = jax.jit(lambda it: jax.random.fold_in(jax.random.fold_in(key, it), 2))
        self._block, self._drawn = -1, None

    def __call__(self, it: int) -> tuple[int, int, jax.Array]:
        b = it // self.BLOCK
        if b != self._block:
            its = np.arange(b * self.BLOCK, (b + 1) * self.BLOCK, dtype=np.int32)
            self._block, self._drawn = b, jax.device_get(self._draw(jax.device_put(its)))
        e, t = (int(a[it - b * self.BLOCK]) for a in self._drawn)
        return e, t, self._key(jax.device_put(np.int32(it)))

@functools.lru_cache(maxsize=8)
def _matcher(model, num_steps, batch, dsa, memory, loop, unroll, fast_conv, compute_dtype):
    # Cached so that repeated distillations in one process (resumes, tests, several pruning
    # runs) reuse the compiled student steps.
    augment = make_augment("dsa", strategy=dsa[0], all_ops=dsa[1]) if dsa else None
    return TrajectoryMatcher(model, num_steps=num_steps, batch_size=batch, augment=augment,
                             memory=memory, loop=loop, unroll=unroll, fast_conv=fast_conv,
                             compute_dtype=compute_dtype)


def build_method(config, dataset, traj: Trajectories, *,
                 mask: Optional[PyTree] = None) -> common.DistillProgram:
    """MTT as a :class:`dp_jax.distill.common.DistillProgram` (state: images, log step size and both
    optimiser states).

    Iteration ``it`` uses ``k = fold_in(fold_in(distill_key, rng.DISTILL_MTT), it)``: the expert
    is ``randint(fold_in(k, 0), num_experts)``, the start epoch ``randint(fold_in(k, 1),
    max_start_epoch)``, and the student's minibatches/augmentation come from ``fold_in(k, 2)``.
    """
    d = config.distill
    model = create_model(config.model, num_classes=dataset.num_classes)
    mask = masks_lib.ones_like(traj.like) if mask is None else mask
    factor = int(d.factor)
    n_train = d.ipc * dataset.num_classes * factor ** 2
    batch = int(d.batch_syn) or n_train
    matcher = _matcher(model, int(d.syn_steps), batch,
                       (d.dsa_strategy, bool(d.dsa_all_ops)) if d.dsa else None, d.memory,
                       resolve_loop(d.loop, traj.like), int(d.unroll), bool(d.fast_conv),
                       config.train.compute_dtype)
    tx_img = common.sgd(float(d.lr_img), float(d.momentum_img))
    tx_lr = common.sgd(float(d.lr_lr), float(d.momentum_lr))
    k_mtt = jax.random.fold_in(distill_key(config), rng.DISTILL_MTT)
    images, labels = common.initial_images(config, dataset)
    log_lr = jnp.asarray(np.log(float(d.lr_init)), jnp.float32)

    @jax.jit
    def decode(imgs):
        return jax.vjp(lambda v: synthetic.decode(v, labels, factor)[0], imgs)

    y_train = synthetic.decode(images, labels, factor)[1]

    picks = _Picks(k_mtt, traj.num_experts, int(d.max_start_epoch))

    def step(state, it):
        e, t, key = picks(it)
        p_start, bn = traj.get(e, t)
        p_target, _ = traj.get(e, t + int(d.expert_epochs))
        x, vjp = decode(state["images"])
        loss, gx, glr = matcher(x, y_train, state["log_lr"], p_start, p_target, mask, key, bn)
        (g_img,) = vjp(gx)
        opt_img, opt_lr = state["opt"]
        imgs, lr, opt_img, opt_lr = apply_updates(state["images"], state["log_lr"], opt_img,
                                                  opt_lr, g_img, glr, tx_img=tx_img, tx_lr=tx_lr)
        info = {"grad_norm_images": _norm(g_img), "expert": e, "start_epoch": t}
        return {"images": imgs, "log_lr": lr, "opt": (opt_img, opt_lr)}, loss, info

    return common.DistillProgram(
        name="mtt", state={"images": images, "log_lr": log_lr,
                           "opt": (tx_img.init(images), tx_lr.init(log_lr))},
        step=step, lr=lambda state: float(jnp.exp(state["log_lr"])), labels=labels,
        factor=factor, examples=int(d.syn_steps) * min(batch, n_train),
        hint=f"distill.lr_img ({d.lr_img}) or distill.lr_lr ({d.lr_lr})")


def describe(d) -> str:
    """One line for report.md."""
    return (f"MTT: {d.iterations} iterations, N={d.syn_steps} student steps, M={d.expert_epochs} "
            f"expert epochs, start epoch < {d.max_start_epoch}, lr_img {d.lr_img}, lr_lr "
            f"{d.lr_lr} (log step size), memory `{d.memory}`; {d.num_experts} experts x "
            f"{d.expert_train_epochs} epochs (lr {d.expert_lr}, batch {d.expert_batch_size}).")
