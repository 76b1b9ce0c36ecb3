"""Masked functional training: state, optimisers, pure train/eval steps and loops.

Where the mask is applied (the question every pruning user asks):
  * forward pass: the model sees ``params * mask``, so pruned weights carry no
    signal and receive exactly zero gradient;
  * update: the optimiser's updates are multiplied by the mask and the new params
    are re-masked, so pruned weights stay exactly zero under momentum, Adam
    moments and weight decay.

The real-data loop keeps the dataset on the device. Every global step ``t`` uses
the minibatch ``perm_e[(t mod S) * B : ...]`` of the epoch ``e = t // S``
permutation (``S`` steps per epoch, last partial batch dropped), with
``perm_e = permutation(fold_in(key, e))``. A step's batch therefore depends only
on ``(key, t)``: training can stop and resume at any step, and snapshots for
rewinding can be taken at any step, without changing the trajectory.

Two loop forms run the same step: ``scan`` (one compiled program per epoch
segment; best for MLPs and on accelerators) and ``python`` (a jitted step
dispatched from Python with device-resident data; XLA:CPU runs rolled scans over
conv steps ~10x slower, see docs/performance.md). ``auto`` picks by backend and model.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dp_jax.training import optimizers
from dp_jax import masks as masks_lib
from dp_jax.training import precision
from dp_jax.models.convs import fast_convs, only_fast_convs
from dp_jax.training.outputs import check_finite, snapshot
from dp_jax.training.stream import StreamTraining

PyTree = Any

LOOPS = ("auto", "scan", "python")


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training, as one pytree."""
    step: jax.Array
    params: PyTree
    batch_stats: PyTree
    opt_state: PyTree
    mask: PyTree


def create_state(variables: dict, mask: PyTree, tx: optax.GradientTransformation, *,
                 start_step: int = 0) -> TrainState:
    """Fresh state for ``variables`` (from ``model.init``) under ``mask``; params are masked.

    ``start_step`` > 0 (rewinding to step k): the state is at global step k, and so is the
    learning-rate schedule, which goes on from k as in the run rewound to; the optimiser's
    moments start fresh.
    """
    params = masks_lib.apply(variables["params"], mask)
    # Copies: the jitted steps donate the state, which must not invalidate the
    # caller's mask or initial batch statistics (they are reused across rounds).
    copy = lambda t: jax.tree.map(jnp.copy, t)  # noqa: E731
    return TrainState(step=jnp.asarray(start_step, jnp.int32), params=params,
                      batch_stats=copy(variables.get("batch_stats", {})),
                      opt_state=optimizers.schedule_at(tx.init(params), start_step), mask=copy(mask))


def _variables(params, batch_stats):
    return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy against integer labels, or against soft targets
    (``(N, classes)`` rows summing to 1, as CutMix makes)."""
    if labels.ndim == logits.ndim:
        return optax.softmax_cross_entropy(logits, labels).mean()
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def train_step(state: TrainState, x: jax.Array, y: jax.Array, key: jax.Array, *,
               model, tx: optax.GradientTransformation,
               augment: Optional[Callable] = None,
               compute_dtype: str = "float32") -> tuple[TrainState, dict]:
    """One masked SGD step on the minibatch ``(x, y)``; pure, jit it with static model/tx.

    ``compute_dtype="bfloat16"``: the forward and backward pass run in bfloat16 on bfloat16
    copies of the weights and inputs; parameters, masks, optimiser state, BatchNorm statistics,
    the loss and the metrics stay float32 (the gradient is cast back through the copy).
    """
    if augment is not None:
        x = augment(key, x)
    has_bn = bool(state.batch_stats)

    def loss_fn(params):
        v = precision.to_compute(_variables(masks_lib.apply(params, state.mask), state.batch_stats),
                       compute_dtype)
        xc = precision.to_compute(x, compute_dtype)
        # On CPU, stride-1 convolutions go through dp_jax.models.convs: same values, and their
        # gradients lower to kernels XLA:CPU runs fast (also inside a rolled lax.scan).
        with fast_convs(jax.default_backend() == "cpu"):
            if has_bn:
                logits, new_vars = model.apply(v, xc, train=True, mutable=["batch_stats"])
                new_bs = precision.from_compute(new_vars["batch_stats"], compute_dtype)
            else:
                logits, new_bs = model.apply(v, xc, train=True), state.batch_stats
        logits = precision.from_compute(logits, compute_dtype)
        loss = cross_entropy(logits, y)
        return loss, (logits, new_bs)

    (loss, (logits, new_bs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    updates = masks_lib.apply(updates, state.mask)
    params = masks_lib.apply(optax.apply_updates(state.params, updates), state.mask)
    metrics = {"loss": loss,
               "accuracy": jnp.mean(jnp.argmax(logits, -1) ==
                                    (jnp.argmax(y, -1) if y.ndim == logits.ndim else y)),
               "grad_norm": optax.tree.norm(grads),
               "update_norm": optax.tree.norm(updates),
               "param_norm": optax.tree.norm(params)}
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=new_bs,
                              opt_state=opt_state)
    return new_state, metrics


def _constrain(x, mesh: Optional[Mesh]):
    """Shard the leading (batch) axis over the mesh's 'data' axis (no-op without a mesh)."""
    if mesh is None:
        return x
    spec = P("data", *([None] * (x.ndim - 1)))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


class Trainer(StreamTraining):
    """Compiled training on an in-memory dataset; build once, call many times.

    The jitted programs are created in ``__init__`` and reused for every call
    (rounds, seeds, methods), so a new mask or new weights never recompile.

    Args:
      model: a Flax module with ``__call__(x, train)``.
      tx: the optax optimiser.
      batch_size: minibatch size (the last partial batch of an epoch is dropped).
      num_train: number of training examples (fixes steps per epoch).
      loop: ``'scan'`` or ``'python'`` (resolve ``'auto'`` with :func:`resolve_loop`).
      unroll: ``lax.scan`` unroll factor for the ``'scan'`` loop.
      augment: optional ``augment(key, x) -> x`` applied inside the step.
      mesh: optional ``Mesh`` with a ``'data'`` axis; batches are sharded over it.
      compute_dtype: ``float32`` or ``bfloat16`` (see :func:`train_step`); evaluation is float32.
    """

    def __init__(self, model, tx, *, batch_size: int, num_train: int, loop: str = "scan",
                 unroll: int = 1, augment: Optional[Callable] = None,
                 mesh: Optional[Mesh] = None, eval_batch_size: int = 1000,
                 compute_dtype: str = "float32"):
        if compute_dtype not in precision.COMPUTE_DTYPES:
            raise ValueError(f"train.compute_dtype must be one of {precision.COMPUTE_DTYPES}, "
                             f"got {compute_dtype!r}")
        self.compute_dtype = compute_dtype
        if batch_size > num_train:
            raise ValueError(f"train.batch_size={batch_size} is larger than the training set "
                             f"({num_train} examples)")
        if loop not in ("scan", "python"):
            raise ValueError(f"Trainer loop must be 'scan' or 'python', got {loop!r}")
        self.model, self.tx, self.mesh = model, tx, mesh
        self.batch_size, self.num_train = int(batch_size), int(num_train)
        self.steps_per_epoch = self.num_train // self.batch_size
        self.loop = loop
        self.unroll = max(int(unroll), 1)
        self.eval_batch_size = int(eval_batch_size)
        step = functools.partial(train_step, model=model, tx=tx, augment=augment,
                                 compute_dtype=compute_dtype)
        self._step_batch = jax.jit(functools.partial(_one_batch, step=step, mesh=mesh),
                                   donate_argnums=0)
        self._eval = jax.jit(functools.partial(_eval_batch, model=model))
        self._programs = self._build_programs(step)

    def _build_programs(self, step: Callable) -> dict:
        """``{seeds: (perm, segment, step)}``: one run, and S runs as one program (every
        argument but the data gains a seed axis)."""
        B, S, mesh = self.batch_size, self.steps_per_epoch, self.mesh

        # The batch position comes from the state's own step (on the device), so a hot loop
        # passes no host scalar: nothing to copy per step or epoch on an accelerator.
        def one(state, x, y, perm, key):
            idx = jax.lax.dynamic_slice_in_dim(perm, (state.step % S) * B, B)
            return step(state, _constrain(x[idx], mesh), _constrain(y[idx], mesh),
                        jax.random.fold_in(key, state.step))

        def segment(state, x, y, perm, key, length):
            def body(s, _):
                return one(s, x, y, perm, key)
            return jax.lax.scan(body, state, None, length=length, unroll=self.unroll)

        def one_logged(state, x, y, perm, key):  # a step's metrics as a segment of length 1
            state, m = one(state, x, y, perm, key)
            return state, jax.tree.map(lambda v: v[None], m)

        def perm(key, step):  # the data order of the epoch that holds global step ``step``
            return jax.random.permutation(jax.random.fold_in(key, step // S), self.num_train)

        return {
            False: (jax.jit(perm), jax.jit(segment, static_argnames="length", donate_argnums=0),
                    jax.jit(one_logged, donate_argnums=0)),
            True: (jax.jit(jax.vmap(perm)),
                   jax.jit(_vmapped_segment(segment), static_argnames="length",
                           donate_argnums=0),
                   jax.jit(jax.vmap(one_logged, in_axes=(0, None, None, 0, 0)),
                           donate_argnums=0)),
        }

    def train(self, state: TrainState, x: jax.Array, y: jax.Array, key: jax.Array,
              num_steps: int, *, snapshot_steps: Iterable[int] = (),
              on_epoch: Optional[Callable[[int, dict], None]] = None):
        """Train from ``state.step`` up to global step ``num_steps``.

        Args:
          state: the state to continue from (its ``step`` says where).
          x, y: the full training set, ideally already on the device.
          key: data-order/augmentation key; batches depend only on (key, step).
          num_steps: the global step to stop at.
          snapshot_steps: global steps at which to copy params and batch stats (rewinding).
          on_epoch: called as ``on_epoch(epoch, mean_metrics)`` when an epoch ends.

        Returns:
          ``(state, snapshots)`` with
          ``snapshots = {step: {"params": ..., "batch_stats": ...}}``.
        """
        return self._train(state, x, y, key, num_steps, snapshot_steps, on_epoch, False)

    def train_seeds(self, states: TrainState, x: jax.Array, y: jax.Array, keys: jax.Array,
                    num_steps: int, *, snapshot_steps: Iterable[int] = (),
                    on_epoch: Optional[Callable[[int, list], None]] = None):
        """:meth:`train` for S runs as one vmapped program.

        ``states`` and ``keys`` carry a leading seed axis (:func:`stack`); every run must be
        at the same step. Run ``i`` follows exactly the trajectory :meth:`train` gives it
        alone (same batches, same keys); the data are shared, not copied. ``on_epoch``
        receives the list of the runs' mean metrics. Returns stacked ``(states, snapshots)``.
        """
        steps = np.asarray(jax.device_get(states.step))
        if steps.ndim != 1 or np.any(steps != steps[0]):
            raise ValueError(f"train_seeds needs runs at one step, got steps {steps.tolist()}")
        if self.mesh is not None:
            raise ValueError("seeds as one program (parallel.vmap_seeds) do not combine "
                             "with parallel.data_parallel")
        return self._train(states, x, y, keys, num_steps, snapshot_steps, on_epoch, True)

    def _train(self, state, x, y, key, num_steps, snapshot_steps, on_epoch, seeds: bool):
        perm_fn, segment_fn, step_fn = self._programs[seeds]
        S = self.steps_per_epoch
        # The one read of the device per call (explicit): where the state stands.
        t = int(np.asarray(jax.device_get(state.step)).reshape(-1)[0])
        state = self._replicate(state)
        snaps = {}
        wanted = sorted({int(s) for s in snapshot_steps if t <= int(s) <= num_steps})
        if t in wanted:
            snaps[t] = snapshot(state)
        epoch_metrics = []
        while t < num_steps:
            epoch = t // S
            end = min((epoch + 1) * S, num_steps)
            cut = [s for s in wanted if t < s < end]
            stop = cut[0] if cut else end
            perm = perm_fn(key, state.step)
            if self.loop == "scan":
                state, m = segment_fn(state, x, y, perm, key, length=stop - t)
                epoch_metrics.append(m)  # (steps,), or (seeds, steps)
            else:
                for _ in range(t, stop):
                    state, m = step_fn(state, x, y, perm, key)
                    epoch_metrics.append(m)
            t = stop
            if t in wanted:
                snaps[t] = snapshot(state)
            if t % S == 0 or t == num_steps:
                if on_epoch is not None and epoch_metrics:
                    stacked = jax.tree.map(lambda *v: jnp.concatenate(v, -1), *epoch_metrics)
                    if seeds:
                        on_epoch(epoch, [check_finite(m, epoch * S, t) for m in unstack(stacked)])
                    else:
                        on_epoch(epoch, check_finite(stacked, epoch * S, t))
                epoch_metrics = []
        return state, snaps

    def _replicate(self, tree):
        """Put ``tree`` replicated on the mesh (multi-host: every process passes the same)."""
        if self.mesh is None:
            return tree
        return jax.device_put(tree, NamedSharding(self.mesh, P()))

    def evaluate(self, params: PyTree, batch_stats: PyTree, mask: PyTree,
                 x: jax.Array, y: jax.Array) -> dict:
        """Accuracy and loss over *every* example of ``(x, y)`` (the last batch is padded)."""
        params, batch_stats, mask = self._replicate((params, batch_stats, mask))
        return evaluate(self.model, params, batch_stats, mask, x, y,
                        batch_size=self.eval_batch_size, program=self._eval)


@functools.lru_cache(maxsize=32)
def _eval_program(model):
    # One compiled evaluation per model (models are hashable Flax modules).
    return jax.jit(functools.partial(_eval_batch, model=model))


def evaluate(model, params: PyTree, batch_stats: PyTree, mask: PyTree, x: jax.Array,
             y: jax.Array, *, batch_size: int, program: Optional[Callable] = None) -> dict:
    """Accuracy and loss of the masked network over *every* example of ``(x, y)``, in batches
    of ``batch_size`` (the last one padded to the same compiled shape, its padding weighted 0).

    ``program`` is the compiled batch evaluation (default: one per model, cached)."""
    program = program or _eval_program(model)
    n = int(x.shape[0])
    B = min(int(batch_size), n)
    totals = None
    for s in range(0, n, B):
        xb, yb = x[s:s + B], y[s:s + B]
        w = jnp.ones((xb.shape[0],), jnp.float32)
        if xb.shape[0] < B:  # pad to one compiled shape; padded rows get weight 0
            pad = B - xb.shape[0]
            xb = jnp.concatenate([xb, jnp.zeros((pad,) + xb.shape[1:], xb.dtype)])
            yb = jnp.concatenate([yb, jnp.zeros((pad,), yb.dtype)])
            w = jnp.concatenate([w, jnp.zeros((pad,), jnp.float32)])
        out = program(params, batch_stats, mask, xb, yb, w)
        totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    totals = jax.device_get(totals)
    return {"accuracy": float(totals["correct"] / n), "loss": float(totals["loss"] / n)}


def _one_batch(state, xb, yb, key, *, step, mesh):
    """One step on a streamed batch, already the step's minibatch (dp_jax.data.pipeline)."""
    return step(state, _constrain(xb, mesh), _constrain(yb, mesh),
                jax.random.fold_in(key, state.step))


def _vmapped_segment(segment):
    """``segment`` vmapped over the state, the permutation and the key (data shared)."""
    def fn(state, x, y, perm, key, length):
        return jax.vmap(lambda s, p, k: segment(s, x, y, p, k, length))(state, perm, key)
    return fn


def stack(trees: list) -> PyTree:
    """Stack pytrees of one structure on a new leading (seed) axis."""
    return jax.tree.map(lambda *v: jnp.stack(v), *trees)


def unstack(tree: PyTree) -> list:
    """The per-seed pytrees of a stacked one (inverse of :func:`stack`)."""
    n = jax.tree.leaves(tree)[0].shape[0]
    return [jax.tree.map(lambda v, i=i: v[i], tree) for i in range(n)]


def _eval_batch(params, batch_stats, mask, x, y, w, *, model):
    logits = model.apply(_variables(masks_lib.apply(params, mask), batch_stats), x, train=False)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return {"correct": jnp.sum(w * (jnp.argmax(logits, -1) == y)), "loss": jnp.sum(w * losses)}


def resolve_loop(loop: str, params: PyTree, model=None, image_shape=None) -> str:
    """Resolve ``'auto'``: ``'scan'``, except ``'python'`` for conv nets on CPU.

    XLA:CPU runs the default lowering of conv gradients inside a rolled ``lax.scan`` 10-30x
    slower than as separate programs. Convolutions routed through
    :mod:`dp_jax.models.convs` (what :func:`train_step` does on CPU) do not have that problem,
    so a conv net whose convolutions are all eligible (stride 1, e.g. the MTT ConvNet; known
    when ``model`` and ``image_shape`` are given) gets ``'scan'`` too.
    """
    if loop not in LOOPS:
        raise ValueError(f"train.loop must be one of {LOOPS}, got {loop!r}")
    if loop != "auto":
        return loop
    has_conv = any(len(k.shape) == 4 for k in masks_lib.prunable_leaves(params).values())
    if not has_conv or jax.default_backend() != "cpu":
        return "scan"
    if model is not None and image_shape is not None and only_fast_convs(model, image_shape):
        return "scan"
    return "python"


def total_steps(epochs: int, num_train: int, batch_size: int) -> int:
    """Number of optimiser steps in ``epochs`` epochs (partial batches dropped)."""
    return int(epochs) * (int(num_train) // int(batch_size))
