"""The distillation loop: MTT iterations with checkpoints, metrics and periodic evaluation.

Iteration ``it`` (0-based) uses ``k = fold_in(fold_in(distill_key, rng.DISTILL_MTT), it)``:
the expert is ``randint(fold_in(k, 0), num_experts)``, the start epoch ``randint(fold_in(k, 1),
max_start_epoch)``, and the student's minibatches/augmentation come from ``fold_in(k, 2)``.
Nothing else is random, so a run restored from the checkpoint after iteration ``it`` continues
exactly as an uninterrupted one (images, step size, optimiser states and metrics).

Resume precedence: an existing checkpoint in ``<workdir>/checkpoints/distill`` wins; otherwise
the synthetic set starts from its initialisation. Metric rows of iterations after the restored
checkpoint are dropped from ``metrics.jsonl`` (they are recomputed identically).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from dp_jax import io
from dp_jax import rng
from dp_jax import workdir as workdir_lib
from dp_jax import masks as masks_lib
from dp_jax.data.augment import make_augment
from dp_jax.distill import mtt as mtt_lib
from dp_jax.distill import synthetic
from dp_jax.distill.experts import Trajectories, distill_key
from dp_jax.models import create_model
from dp_jax.train import TrainingDivergedError

PyTree = Any
DISTILL_PHASES = ("distill", "distill_eval")


@dataclasses.dataclass
class LoopResult:
    """What the distillation loop produced."""
    stored_images: np.ndarray
    stored_labels: np.ndarray
    images: np.ndarray
    labels: np.ndarray
    lr: float
    iterations: int
    examples: int          # synthetic examples the students processed (sum of batch sizes)
    wall_s: float          # distillation wall time, summed over resumed sessions
    last_loss: float


@functools.lru_cache(maxsize=8)
def _matcher(model, num_steps, batch, dsa, memory, loop, unroll, fast_conv):
    # Cached so that repeated distillations in one process (resumes, tests, several pruning
    # runs) reuse the compiled student steps.
    augment = make_augment("dsa", strategy=dsa[0], all_ops=dsa[1]) if dsa else None
    return mtt_lib.TrajectoryMatcher(model, num_steps=num_steps, batch_size=batch,
                                     augment=augment, memory=memory, loop=loop, unroll=unroll,
                                     fast_conv=fast_conv)


@functools.lru_cache(maxsize=16)
def _sgd(lr: float, momentum: float) -> optax.GradientTransformation:
    # One object per setting: apply_updates is jitted with the optimiser as a static argument.
    return optax.sgd(lr, momentum=momentum or None)


def _truncate_metrics(path: str, after: int) -> None:
    rows = io.read_jsonl(path)
    keep = [r for r in rows
            if not (r.get("phase") in DISTILL_PHASES and r.get("iteration", 0) > after)]
    if len(keep) != len(rows):
        io.write_jsonl(path, keep)


def distill_loop(config, dataset, traj: Trajectories, workdir: str, *,
                 mask: Optional[PyTree] = None,
                 log: Callable[..., None] = lambda **kw: None,
                 evaluator=None) -> LoopResult:
    """Run (or resume) ``config.distill.iterations`` MTT iterations.

    Args:
      config: full config (``model``, ``seed``, ``distill``).
      dataset: the real ``Dataset`` (initial images; periodic evaluation).
      traj: expert trajectories (from :func:`dp_jax.distill.experts.load_trajectories`).
      workdir: checkpoints go to ``<workdir>/checkpoints/distill``; metrics are appended to
        ``<workdir>/metrics.jsonl`` through ``log``.
      mask: optional params-shaped boolean mask: distil for a pruned student.
      log: called with keyword metrics (one JSON line each).
      evaluator: optional :class:`dp_jax.distill.evaluate.SetEvaluator` for periodic evaluation.
    """
    d = config.distill
    model = create_model(config.model, num_classes=dataset.num_classes)
    like_params = traj.like
    if mask is None:
        mask = masks_lib.ones_like(like_params)
    loop = mtt_lib.resolve_loop(d.loop, like_params)
    factor = int(d.factor)
    n_train = d.ipc * dataset.num_classes * factor ** 2
    batch = int(d.batch_syn) or n_train
    matcher = _matcher(model, int(d.syn_steps), batch,
                       (d.dsa_strategy, bool(d.dsa_all_ops)) if d.dsa else None, d.memory, loop,
                       int(d.unroll), bool(d.fast_conv))
    tx_img = _sgd(float(d.lr_img), float(d.momentum_img))
    tx_lr = _sgd(float(d.lr_lr), float(d.momentum_lr))

    root = distill_key(config)
    k_mtt = jax.random.fold_in(root, rng.DISTILL_MTT)
    k_eval = jax.random.fold_in(root, rng.DISTILL_EVAL)
    images0, labels = synthetic.init_synthetic(
        dataset.x_train, dataset.y_train, ipc=int(d.ipc), num_classes=dataset.num_classes,
        factor=factor, init=d.init,
        seed=int(jax.random.randint(jax.random.fold_in(root, rng.DISTILL_SYN_INIT), (), 0, 2**31 - 1)))
    labels = jnp.asarray(labels)
    images = jnp.asarray(images0)
    log_lr = jnp.asarray(np.log(float(d.lr_init)), jnp.float32)
    opt_img, opt_lr = tx_img.init(images), tx_lr.init(log_lr)

    @jax.jit
    def decode(imgs):
        return jax.vjp(lambda v: synthetic.decode(v, labels, factor)[0], imgs)

    y_train = synthetic.decode(images, labels, factor)[1]

    @jax.jit
    def pick(it):
        k = jax.random.fold_in(k_mtt, it)
        e = jax.random.randint(jax.random.fold_in(k, 0), (), 0, traj.num_experts)
        t = jax.random.randint(jax.random.fold_in(k, 1), (), 0, int(d.max_start_epoch))
        return e, t, jax.random.fold_in(k, 2)

    ckpt = io.RoundCheckpointer(workdir_lib.distill_checkpoints(workdir), max_to_keep=2)
    opt_leaves, opt_def = jax.tree.flatten((opt_img, opt_lr))
    start, wall_prev, examples = 0, 0.0, 0
    try:
        if ckpt.latest() is not None:
            like = {"images": images, "log_lr": log_lr,
                    "opt": {str(i): v for i, v in enumerate(opt_leaves)}}
            arrays, payload = ckpt.restore(ckpt.latest(), like)
            images, log_lr = jnp.asarray(arrays["images"]), jnp.asarray(arrays["log_lr"])
            opt_img, opt_lr = jax.tree.unflatten(
                opt_def, [jnp.asarray(arrays["opt"][str(i)]) for i in range(len(opt_leaves))])
            start, wall_prev = int(payload["iteration"]), float(payload["wall_s"])
            examples = int(payload["examples"])
            _truncate_metrics(workdir_lib.metrics_path(workdir), start)

        def save(it_done, wall):
            leaves = jax.tree.leaves((opt_img, opt_lr))
            ckpt.save(it_done, {"images": images, "log_lr": log_lr,
                                "opt": {str(i): v for i, v in enumerate(leaves)}},
                      {"iteration": it_done, "wall_s": wall, "examples": examples})

        t0 = time.time()
        window: list[float] = []
        loss_f = float("nan")
        bar = tqdm(range(start, int(d.iterations)), desc="distill", dynamic_ncols=True,
                   mininterval=1.0, disable=None)
        for it in bar:
            e, t, key = pick(it)
            e, t = int(e), int(t)
            p_start, bn = traj.get(e, t)
            p_target, _ = traj.get(e, t + int(d.expert_epochs))
            x, vjp = decode(images)
            loss, gx, glr = matcher(x, y_train, log_lr, p_start, p_target, mask, key, bn)
            loss_f = float(loss)
            if not np.isfinite(loss_f):
                raise TrainingDivergedError(
                    f"distillation loss is not finite at iteration {it}; lower "
                    f"distill.lr_img ({d.lr_img}) or distill.lr_lr ({d.lr_lr})")
            (g_img,) = vjp(gx)
            images, log_lr, opt_img, opt_lr = mtt_lib.apply_updates(
                images, log_lr, opt_img, opt_lr, g_img, glr, tx_img=tx_img, tx_lr=tx_lr)
            examples += int(d.syn_steps) * min(batch, n_train)
            window.append(loss_f)
            done = it + 1
            if done % int(d.log_every) == 0 or done == int(d.iterations):
                lr_now = float(jnp.exp(log_lr))
                log(phase="distill", iteration=done, loss=float(np.mean(window)),
                    loss_last=loss_f, lr=lr_now, grad_norm_images=float(optax.tree.norm(g_img)),
                    expert=e, start_epoch=t, wall_s=wall_prev + time.time() - t0)
                bar.set_postfix_str(f"loss {np.mean(window):.4f} lr {lr_now:.4g}")
                window = []
            if evaluator is not None and d.eval_every and done % int(d.eval_every) == 0:
                xe, ye = synthetic.decode(images, labels, factor)
                res = evaluator.run(xe, ye, float(jnp.exp(log_lr)), jax.random.fold_in(k_eval, done),
                                    num_models=int(d.eval_periodic_models))
                log(phase="distill_eval", iteration=done, **res)
            if done % int(d.checkpoint_every) == 0 or done == int(d.iterations):
                save(done, wall_prev + time.time() - t0)
        bar.close()
        wall = wall_prev + time.time() - t0
    finally:
        ckpt.close()
    xe, ye = synthetic.decode(images, labels, factor)
    return LoopResult(stored_images=np.asarray(images), stored_labels=np.asarray(labels),
                      images=np.asarray(xe), labels=np.asarray(ye),
                      lr=float(jnp.exp(log_lr)), iterations=int(d.iterations),
                      examples=examples, wall_s=wall, last_loss=loss_f)
