"""Analyses of a finished workdir: instability, Hessian and landscapes of its saved masks.

``run(workdir, ...)`` is what ``python -m dp_jax.analysis`` calls. It rebuilds the
experiment from ``workdir/config.json`` exactly as :mod:`dp_jax.tasks.prune` does
(dataset, model, optimiser, the seed's init ``init_fn(fold_in(key(seed),
rng.INIT))``), and for every selected mask ``runs/<label>-seed<s>/masks/round_XXX.npz``:

  1. trains ``P`` copies from the mask's *starting point* -- the method's rewind
     point (init for k=0, the dense run's weights at step k otherwise, a fresh
     init for ``reinit``), masked -- with the config's training settings on the
     real training set (copy 0 retraces the run's own evaluation training);
  2. instability: interpolation between every pair of copies, barriers,
     layer-wise interpolation, L2 distances;
  3. Hessian of the training loss at copy 0 (and optionally at the start point);
  4. landscapes around the copies.

It also computes the dense network's instability as a function of the rewind
step k and the Hamming distances between the methods' masks. Outputs:
``analysis/*.json`` (plus npz of Hessian diagonals and landscape directions),
``plots/*.png`` and the ``<!-- analysis -->`` section of ``report.md``.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dp_jax.pruning import setup as setup_lib
from dp_jax.pruning.settings import Experiment
from dp_jax.tasks import settings as settings_lib
from dp_jax.pruning import dense
from dp_jax.storage import fileio
from dp_jax import masks as masks_lib
from dp_jax import methods
from dp_jax import rng
from dp_jax.training import trainer as train_lib
from dp_jax.rundir import paths as workdir_lib
from dp_jax.analysis import family, hessian, instability, landscape, resume
from dp_jax.reports import analysis as report_lib
from dp_jax.data import load_dataset

from dp_jax.analysis.settings import ANALYSES, BN_CHOICES, HESSIAN_POINTS, Settings  # noqa: F401


tag = workdir_lib.analysis_stem  # file stem of one mask's results


def _digest(mask) -> str:
    h = hashlib.sha1()
    for k, v in sorted(masks_lib.to_flat(mask).items()):
        h.update(k.encode())
        h.update(np.packbits(v).tobytes())
    return h.hexdigest()


class _Context:
    """Everything shared by the analyses of one workdir (compiled once)."""

    def __init__(self, workdir: str, cfg: Experiment, settings: Settings,
                 analyses: Sequence[str], log):
        self.workdir, self.cfg, self.settings, self.log = workdir, cfg, settings, log
        self.analyses = tuple(analyses)
        dataset = load_dataset(cfg.data, seed=cfg.seed)
        self.setup = setup_lib.build_setup(cfg, dataset)
        self.specs = _specs(cfg)
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
        self.num_copies = max(settings.copies, 3 if "landscape" in self.analyses else 2)
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
        self.digest = resume.settings_digest(settings, self.analyses)

    def hessian_engine(self, params):
        """The Hessian engine (built on first use, then shared by every mask)."""
        if self.engine is None:
            self.engine = hessian.HessianEngine(self.setup.model, params)
        return self.engine

    def copies(self, seed: int, variables: dict, mask, start_step: int, start_tag: tuple,
               num: Optional[int] = None, first: Optional[dict] = None):
        """``num`` trained copies from a start point (default: as many as the analyses need).

        ``first``: copy 0 (the run's own training, read from its kept checkpoint), so that
        only the other copies are trained. Copies of dense masks are kept: runs share round 0,
        and the rewind curve reuses them.
        """
        num = num or self.num_copies
        dense = masks_lib.sparsity(mask) == 0.0
        key = (seed, start_tag)
        if dense and key in self._dense_cache and len(self._dense_cache[key][0]) >= num:
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
        if dense:
            self._dense_cache[key] = out
        return out


class _SeedState:
    """A seed's init, rewind snapshots and BatchNorm/evaluation subsets."""

    def __init__(self, ctx: _Context, seed: int, ks_needed: Sequence[int]):
        s, settings = ctx.setup, ctx.settings
        self.seed = seed
        root = jax.random.key(seed)
        self.init = s.init_fn(jax.random.fold_in(root, rng.INIT))
        self.reinit = None
        self.snapshots = {0: {"params": self.init["params"],
                              "batch_stats": self.init.get("batch_stats", {})}}
        ks = sorted({int(k) for k in ks_needed if k > 0})
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
            self.snapshots.update(instability.dense_snapshots(
                s.trainer, s.tx, self.init, s.x_train, s.y_train,
                jax.random.fold_in(root, rng.DATA), missing))
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

    def start_point(self, ctx: _Context, spec: methods.Spec):
        """``(variables, start_step, start_tag)`` the method trains every round from."""
        if methods.get(spec.name).start(spec) == ("reinit",):
            if self.reinit is None:
                root = jax.random.key(self.seed)
                self.reinit = ctx.setup.init_fn(jax.random.fold_in(root, rng.REINIT))
            return self.reinit, 0, ("reinit",)
        k = spec.rewind_step
        return self.snapshots[k], k, ("rewind", k)


def default_k_values(ctx: _Context) -> list[int]:
    """0, a quarter, half and one epoch, and the config's rewind steps (below the run's length)."""
    S = ctx.copy_trainer.steps_per_epoch
    ks = {0, S // 4, S // 2, S} | {sp.rewind_step for sp in ctx.specs.values()}
    return sorted(k for k in ks if 0 <= k < ctx.setup.num_steps)


def _record_accuracy(workdir: str, label: str, seed: int, rnd: int) -> Optional[float]:
    rows = fileio.read_jsonl(workdir_lib.run_rounds_path(workdir, label, seed))
    for r in rows:
        if r.get("round") == rnd:
            return r.get("test_accuracy")
    return None


def _specs(cfg: Experiment) -> dict:
    return {s.label: s for s in cfg.specs}


def _parse_selection(workdir: str, cfg, runs, rounds, seed):
    """Check the selection; ``(todo, seeds, runs)``, todo = [(seed, label, round, mask path)]."""
    specs = _specs(cfg)
    labels = list(specs)
    runs = list(runs) if runs else labels
    unknown = [r for r in runs if r not in specs]
    if unknown:
        raise ValueError(f"--runs: unknown run(s) {unknown}; this workdir has: {labels}")
    all_seeds = [cfg.seed + i for i in range(cfg.seeds)]
    if seed is not None and seed not in all_seeds:
        raise ValueError(f"--seed={seed} is not a seed of this workdir; seeds: {all_seeds}")
    seeds = [seed] if seed is not None else all_seeds
    explicit = rounds is not None
    rounds = list(rounds) if explicit else list(range(cfg.prune.rounds + 1))
    bad = [r for r in rounds if not 0 <= r <= cfg.prune.rounds]
    if bad:
        raise ValueError(f"--rounds: {bad} outside 0..{cfg.prune.rounds}")
    todo = []
    for s in seeds:
        for label in runs:
            for rnd in rounds:
                path = workdir_lib.mask_path(workdir, label, s, rnd)
                if os.path.exists(path):
                    todo.append((s, label, rnd, path))
                elif explicit:
                    raise FileNotFoundError(f"no mask {path}; has the run finished that round?")
    if not todo:
        raise FileNotFoundError(f"no masks found under {workdir}/runs for runs={runs}, "
                                f"seeds={seeds}")
    return todo, seeds, runs


def analyze_mask(ctx: _Context, ss: _SeedState, label: str, rnd: int, path: str) -> dict:
    """Every requested analysis of one mask; writes its analysis/*.json (and npz) files.

    A mask that another run shares with the same start point (round 0's dense
    mask, typically) reuses that run's results instead of recomputing them.

    Returns:
      ``{analysis: result}`` for the analyses run.
    """
    spec = ctx.specs[label]
    mask = masks_lib.load(path, ss.init["params"])
    variables, k, start_tag = ss.start_point(ctx, spec)
    digest = _digest(mask)
    meta = {"run": label, "seed": ss.seed, "round": rnd, "sparsity": masks_lib.sparsity(mask),
            "start": "reinit" if start_tag == ("reinit",) else f"rewind k={k}", "start_step": k,
            "mask_sha1": digest,
            "record_test_accuracy": _record_accuracy(ctx.workdir, label, ss.seed, rnd)}
    done = resume.finished(ctx.workdir, label, ss.seed, rnd, ctx.digest, digest)
    if done is not None:
        return done
    key = (ss.seed, start_tag, digest)
    if key in ctx.results_cache:
        results, arrays = ctx.results_cache[key]
    else:
        trained = resume.kept_trained(ctx.workdir, label, ss.seed, rnd, {
            "params": ss.init["params"], "batch_stats": ss.init.get("batch_stats", {})})
        results, arrays = _compute(ctx, ss, mask, variables, k, start_tag, first=trained)
        if meta["sparsity"] == 0.0:  # only dense masks recur across runs; keep memory flat
            ctx.results_cache[key] = (results, arrays)
    return resume.write_results(ctx.workdir, label, ss.seed, rnd, ctx.digest, meta, results,
                                arrays)


def _compute(ctx: _Context, ss: _SeedState, mask, variables: dict, k: int, start_tag: tuple,
             first: Optional[dict] = None):
    """The analyses of one (start point, mask): ``(results, npz arrays by file-name parts)``.

    ``first``: the run's trained weights (copy 0), when its round checkpoint is kept.
    """
    settings = ctx.settings
    if ctx.analyses == ("hessian",) and first is not None:
        copies, train_info = [first], {"copy0": "kept checkpoint"}  # nothing to train
    else:
        copies, train_info = ctx.copies(ss.seed, variables, mask, k, start_tag, first=first)
    results, arrays = {}, {}
    bn = {"bn_mode": settings.bn_modes[0], "bn_batches": ss.bn_batches}
    if "instability" in ctx.analyses:
        t0 = time.time()
        # Pairs among the requested copies only; a third copy trained for the
        # landscape plane would triple the pairs otherwise.
        r = instability.analyze_copies(
            ctx.evaluator, copies[:settings.copies], mask, ctx.x_eval, ctx.y_eval,
            alphas=ctx.alphas, bn_modes=settings.bn_modes, bn_batches=ss.bn_batches,
            with_layerwise=settings.layerwise, batches=ctx.eval_batches)
        r.update(wall_s=time.time() - t0, num_test_examples=int(ctx.x_eval.shape[0]),
                 copies_training=train_info)
        results["instability"] = r
    if "hessian" in ctx.analyses:
        t0 = time.time()
        points = {"trained": copies[0],
                  "start": {"params": masks_lib.apply(variables["params"], mask),
                            "batch_stats": variables.get("batch_stats", {})}}
        h = {}
        for where in settings.hessian_at:
            p = points[where]
            summary, diag = hessian.analyze(
                ctx.hessian_engine(p["params"]), p["params"], p["batch_stats"], mask,
                ss.hessian_x, ss.hessian_y,
                jax.random.fold_in(instability.analysis_key(ss.seed, rng.ANALYSIS_HESSIAN_PROBES),
                                   HESSIAN_POINTS.index(where)),
                top_k=settings.top_k, lanczos_steps=settings.lanczos_steps,
                trace_probes=settings.trace_probes, slq_probes=settings.slq_probes,
                batch_size=settings.hessian_batch)
            h[where] = summary
            arrays[("hessian_", f"_{where}_diag.npz")] = {
                "diag": diag.astype(np.float32),
                "mask": np.asarray(ctx.engine.flatten(mask)).astype(bool)}
        r = {**h[settings.hessian_at[0]], "at": settings.hessian_at[0]}
        for where in settings.hessian_at[1:]:
            r[where] = h[where]
        r["wall_s"] = time.time() - t0
        r["trained_weights"] = train_info.get("copy0", "retrained")
        results["hessian"] = r
    if "landscape" in ctx.analyses:
        t0 = time.time()
        key = instability.analysis_key(ss.seed, rng.ANALYSIS_LANDSCAPE_DIRS)
        r, dirs = landscape.analyze(
            ctx.evaluator, copies, mask, ss.land_x, ss.land_y, key,
            grid=settings.landscape_grid, line_points=settings.landscape_points,
            span=settings.landscape_span, **bn)
        arrays[("landscape_", "_directions.npz")] = landscape.directions_arrays(
            dirs, seed=ss.seed, purpose=rng.ANALYSIS_LANDSCAPE_DIRS)
        r.update(wall_s=time.time() - t0, bn_mode=bn["bn_mode"] if ctx.has_bn else "none")
        results["landscape"] = r
    return results, arrays


def rewind_curve(ctx: _Context, ss: _SeedState, ks: Sequence[int]) -> dict:
    """Instability of the dense network started at each rewind step ``k``; writes its JSON."""
    t0 = time.time()
    mask = masks_lib.ones_like(ss.init["params"])
    rows = []
    for k in ks:
        copies, _ = ctx.copies(ss.seed, ss.snapshots[k], mask, k, ("rewind", k),
                               num=ctx.settings.copies)
        r = instability.analyze_copies(ctx.evaluator, copies[:ctx.settings.copies], mask,
                                       ctx.x_eval, ctx.y_eval,
                                       alphas=ctx.alphas, bn_modes=ctx.settings.bn_modes,
                                       bn_batches=ss.bn_batches, with_layerwise=False,
                                       batches=ctx.eval_batches)
        rows.append(r)
        ctx.log(f"seed {ss.seed} dense k={k}: error barrier {100 * r['barrier']:.2f} pp")
    out = {"seed": ss.seed, "k": [int(k) for k in ks], "alphas": ctx.alphas.tolist(),
           "steps_per_epoch": ctx.copy_trainer.steps_per_epoch, "num_steps": ctx.setup.num_steps,
           "barrier": [r["barrier"] for r in rows],
           "loss_barrier": [r["loss_barrier"] for r in rows],
           "error": [r["error"] for r in rows], "loss": [r["loss"] for r in rows],
           "copy_test_error": [r["copy_test_error"] for r in rows],
           "l2_distance": [r["l2_distance"][0]["l2"] for r in rows],
           "bn_mode": rows[0]["bn_mode"], "wall_s": time.time() - t0}
    fileio.write_json(workdir_lib.analysis_path(ctx.workdir, f"instability_dense_k_seed{ss.seed}.json"),
                  out)
    return out


def mask_distances(ctx: _Context, seeds, runs, rounds_by: dict) -> dict:
    """Hamming distance and IoU between the masks of every pair of runs, per seed and round."""
    out = []
    like = jax.eval_shape(ctx.setup.init_fn, jax.random.key(0))["params"]
    for s in seeds:
        for a, b in itertools.combinations(runs, 2):
            for rnd in sorted(set(rounds_by.get((s, a), ())) & set(rounds_by.get((s, b), ()))):
                pa, pb = (workdir_lib.mask_path(ctx.workdir, r, s, rnd) for r in (a, b))
                h = masks_lib.hamming(masks_lib.load(pa, like), masks_lib.load(pb, like))
                out.append({"seed": s, "round": rnd, "runs": [a, b], **h})
    return {"pairs": out}


def run(workdir: str, *, analyses: Sequence[str] = ANALYSES, runs: Optional[Sequence[str]] = None,
        rounds: Optional[Sequence[int]] = None, seed: Optional[int] = None,
        settings: Settings = Settings(), log: Callable[[str], None] = lambda m: None) -> dict:
    """Run the analyses on a finished workdir (see module doc).

    Args:
      workdir: a directory written by ``python -m dp_jax.main``.
      analyses: any of ``ANALYSES``.
      runs: run labels (e.g. ``imp_k0``, ``random``); default every run of the config.
      rounds: rounds to analyse; default every round whose mask exists.
      seed: one seed; default every seed of the config.
      settings: analysis knobs (:class:`Settings`).
      log: progress callback taking a message.

    Returns:
      ``{"results": {tag: {analysis: result}}, "rewind_curves": {...}, "wall_s"}``.
    """
    t_start = time.time()
    analyses = tuple(analyses)
    bad = [a for a in analyses if a not in ANALYSES]
    if bad or not analyses:
        raise ValueError(f"--analyses: unknown {bad}; allowed: {', '.join(ANALYSES)}")
    settings.validate()
    cfg, _ = settings_lib.from_workdir(workdir)
    todo, seeds, run_labels = _parse_selection(workdir, cfg, runs, rounds, seed)
    ctx = _Context(workdir, cfg, settings, analyses, log)
    ks = list(settings.k_values) if settings.k_values is not None else default_k_values(ctx)
    bad_k = [k for k in ks if not 0 <= k < ctx.setup.num_steps]
    if bad_k:
        raise ValueError(f"k_values {bad_k} outside 0..{ctx.setup.num_steps - 1} (training steps)")
    os.makedirs(workdir_lib.analysis_dir(workdir), exist_ok=True)
    results, curves = {}, {}
    for s in seeds:
        mine = [t for t in todo if t[0] == s]
        need = {ctx.specs[label].rewind_step for _, label, _, _ in mine}
        if "instability" in analyses:
            need |= set(ks)
        ss = _SeedState(ctx, s, sorted(need))
        for _, label, rnd, path in mine:
            t0 = time.time()
            results[tag(label, s, rnd)] = r = analyze_mask(ctx, ss, label, rnd, path)
            msg = [f"{tag(label, s, rnd)}:"]
            if "instability" in r:
                msg.append(f"barrier {100 * r['instability']['barrier']:.2f} pp")
            if "hessian" in r:
                msg.append(f"lambda_max {r['hessian']['top_eigenvalues'][0]:.4g}")
            log(" ".join(msg) + f" ({time.time() - t0:.1f} s)")
        if "instability" in analyses:
            curves[s] = rewind_curve(ctx, ss, ks)
    rounds_by = {}
    for s, label, rnd, _ in todo:
        rounds_by.setdefault((s, label), []).append(rnd)
    if len(run_labels) > 1:
        fileio.write_json(workdir_lib.analysis_path(workdir, "masks.json"),
                      mask_distances(ctx, seeds, run_labels, rounds_by))
    report_lib.write(workdir)
    return {"results": results, "rewind_curves": curves, "wall_s": time.time() - t_start}
