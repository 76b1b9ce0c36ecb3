"""What the analyses of one workdir share: :class:`Context` (per workdir) and :class:`SeedState`.

The context rebuilds the experiment from its settings exactly as :mod:`dp_jax.tasks.prune`
does (dataset, model, optimiser) and compiles the programs every mask reuses: the copy
trainer, the family evaluator and, on first use, the Hessian engine. A seed's state holds its
init (``init_fn(fold_in(key(seed), rng.INIT))``), the rewind snapshots its masks start from and
the data subsets the analyses draw with the seed's analysis keys.
"""

from __future__ import annotations

import os
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dp_jax import masks as masks_lib
from dp_jax import methods
from dp_jax import rng
from dp_jax.pruning.plan import TRAINED, Start
from dp_jax.analysis import family, hessian, instability, resume
from dp_jax.analysis.settings import Settings
from dp_jax.data import load_dataset
from dp_jax.pruning import dense
from dp_jax.pruning import setup as setup_lib
from dp_jax.pruning.settings import Experiment
from dp_jax.rundir import paths as workdir_lib
from dp_jax.training import trainer as train_lib


def specs_by_label(cfg: Experiment) -> dict:
    """The experiment's method specs by run label."""
    return {s.label: s for s in cfg.specs}


class Context:
    """Everything shared by the analyses of one workdir (compiled once).

    ``analyses``: the selected :class:`dp_jax.analysis.registry.Analysis` objects; the copies
    trained per start point are the most any of them needs (at least ``settings.copies``).
    """

    def __init__(self, workdir: str, cfg: Experiment, settings: Settings,
                 analyses: Sequence, log):
        self.workdir, self.cfg, self.settings, self.log = workdir, cfg, settings, log
        self.analyses = tuple(analyses)
        dataset = load_dataset(cfg.data, seed=cfg.seed)
        self.setup = setup_lib.build_setup(cfg, dataset)
        self.specs = specs_by_label(cfg)
        s = self.setup
        like = jax.eval_shape(s.init_fn, jax.random.key(0))
        self.has_bn = bool(like.get("batch_stats"))
        loop = train_lib.resolve_loop(cfg.train.loop, like["params"], s.model, s.image_shape)
        self.copy_trainer = instability.CopyTrainer(
            s.model, s.tx, batch_size=cfg.train.batch_size, num_train=int(s.y_train.shape[0]),
            loop=loop, unroll=cfg.train.unroll)
        # One chunk size for every grid (alpha sweeps, lines, planes): the compiled
        # evaluation programs then differ only in the number of anchors (2 or 3).
        self.evaluator = family.FamilyEvaluator(s.model, eval_batch_size=cfg.train.eval_batch_size,
                                                chunk=settings.eval_chunk or settings.alphas)
        self.engine = None
        self.num_copies = max([settings.copies] + [a.copies for a in self.analyses])
        self.alphas = np.linspace(0.0, 1.0, settings.alphas)
        n_test = int(s.y_test.shape[0])
        self.x_eval, self.y_eval = s.x_test, s.y_test
        if settings.eval_examples and settings.eval_examples < n_test:
            self.x_eval = s.x_test[:settings.eval_examples]
            self.y_eval = s.y_test[:settings.eval_examples]
        self.eval_batches = family.pad_batches(self.x_eval, self.y_eval,
                                               cfg.train.eval_batch_size)
        self._dense_cache = {}
        self.results_cache = {}
        self.digest = resume.settings_digest(settings, [a.name for a in self.analyses])

    def hessian_engine(self, params) -> hessian.HessianEngine:
        """The Hessian engine (built on first use, then shared by every mask)."""
        if self.engine is None:
            self.engine = hessian.HessianEngine(self.setup.model, params)
        return self.engine

    def copies(self, seed: int, variables: dict, mask, start_step: int, start_tag: Start,
               num: Optional[int] = None, first: Optional[dict] = None):
        """``num`` trained copies from a start point (default: as many as the analyses need).

        ``first``: copy 0 (the run's own training, read from its kept checkpoint), so that
        only the other copies are trained. Copies of dense masks are kept: runs share round 0,
        and the rewind curve reuses them.
        """
        num = num or self.num_copies
        is_dense = masks_lib.sparsity(mask) == 0.0
        key = (seed, start_tag)
        if is_dense and key in self._dense_cache and len(self._dense_cache[key][0]) >= num:
            return self._dense_cache[key]
        t0 = time.time()
        s = self.setup
        keys = instability.copy_keys(seed, num)
        copies, metrics = instability.spawn_copies(
            self.copy_trainer, variables, mask, keys if first is None else keys[1:],
            s.x_train, s.y_train, start_step=start_step, num_steps=s.num_steps)
        if first is not None:
            copies = [first] + copies
        out = (copies, {"last_epoch": metrics, "wall_s": time.time() - t0,
                        "copy0": "retrained" if first is None else "kept checkpoint"})
        if is_dense:
            self._dense_cache[key] = out
        return out


class SeedState:
    """A seed's init, rewind snapshots and BatchNorm/evaluation subsets."""

    def __init__(self, ctx: Context, seed: int, ks_needed: Sequence[int]):
        s, settings = ctx.setup, ctx.settings
        self.seed = seed
        root = jax.random.key(seed)
        self.init = s.init_fn(jax.random.fold_in(root, rng.INIT))
        self.reinit = None
        self.snapshots = {0: {"params": self.init["params"],
                              "batch_stats": self.init.get("batch_stats", {})}}
        self._add_snapshots(ctx, sorted({int(k) for k in ks_needed if k > 0}))
        self.bn_batches = None
        if ctx.has_bn:
            self.bn_batches = family.bn_batches(
                s.x_train, instability.analysis_key(seed, rng.ANALYSIS_BN_BATCHES),
                num_batches=settings.bn_batches, batch_size=ctx.cfg.train.batch_size)
        self.hessian_x, self.hessian_y = hessian.data_subset(
            s.x_train, s.y_train, instability.analysis_key(seed, rng.ANALYSIS_HESSIAN_DATA),
            settings.hessian_examples)
        self.land_x, self.land_y = hessian.data_subset(
            s.x_test, s.y_test, instability.analysis_key(seed, rng.ANALYSIS_LANDSCAPE_DATA),
            settings.landscape_examples)

    def _add_snapshots(self, ctx: Context, ks: list[int]) -> None:
        """The dense weights at each step in ``ks``: the dense run's checkpoints, else retrained."""
        s, seed = ctx.setup, self.seed
        ckpt_dir = workdir_lib.checkpoints_dir(ctx.workdir, workdir_lib.DENSE, seed)
        rewind = sorted({sp.rewind_step for sp in ctx.specs.values() if sp.rewind_step > 0})
        if any(k in rewind for k in ks) and os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
            # The dense run's own snapshots: exactly what the pruning runs rewound to.
            got = dense.dense_run(s, ctx.workdir, seed, rewind)
            # Restored arrays are committed to a device, fresh ones are not; jit keys
            # its cache on that, so mixing them would recompile every program.
            self.snapshots.update({int(k): jax.tree.map(lambda a: jnp.asarray(np.asarray(a)), v)
                                   for k, v in got["snapshots"].items()})
        missing = [k for k in ks if k not in self.snapshots]
        if missing:
            ctx.log(f"seed {seed}: training the dense net to step {max(missing)} for "
                    f"snapshots at {missing}")
            root = jax.random.key(seed)
            self.snapshots.update(instability.dense_snapshots(
                s.trainer, s.tx, self.init, s.x_train, s.y_train,
                jax.random.fold_in(root, rng.DATA), missing))

    def start_point(self, ctx: Context, spec: methods.Spec, rnd: int):
        """``(variables, start_step, start_tag)`` the method trained round ``rnd`` from."""
        start = methods.get(spec.name).start(spec)
        if start.reinit:
            if self.reinit is None:
                root = jax.random.key(self.seed)
                self.reinit = ctx.setup.init_fn(jax.random.fold_in(root, rng.REINIT))
            return self.reinit, 0, start
        if start.kind == TRAINED.kind and rnd > 0:  # learning-rate rewinding
            return self._trained(ctx, spec, rnd - 1), 0, Start(TRAINED.kind, rnd - 1)
        k = spec.rewind_step
        return self.snapshots[k], k, Start("rewind", k)

    def _trained(self, ctx: Context, spec: methods.Spec, rnd: int) -> dict:
        """Round ``rnd``'s trained weights of run ``spec`` (round 0: the dense run's)."""
        like = {"params": self.init["params"], "batch_stats": self.init.get("batch_stats", {})}
        if rnd == 0:
            got = dense.dense_run(ctx.setup, ctx.workdir, self.seed, [])["trained"]
            got = {"params": got["params"], "batch_stats": got.get("batch_stats", {})}
            return jax.tree.map(lambda a: jnp.asarray(np.asarray(a)), got)
        got = resume.kept_trained(ctx.workdir, spec.label, self.seed, rnd, like)
        if got is None:
            raise ValueError(f"{spec.label} seed {self.seed}: round {rnd + 1} trained from "
                             f"round {rnd}'s weights, whose checkpoint is not kept or does not "
                             "verify; analyse it in a run made with checkpoint.keep='all'")
        return got


def default_k_values(ctx: Context) -> list[int]:
    """0, a quarter, half and one epoch, and the config's rewind steps (below the run's length)."""
    S = ctx.copy_trainer.steps_per_epoch
    ks = {0, S // 4, S // 2, S} | {sp.rewind_step for sp in ctx.specs.values()}
    return sorted(k for k in ks if 0 <= k < ctx.setup.num_steps)
