"""Analyses of a finished workdir: instability, Hessian and landscapes of its saved masks.

``run(workdir, ...)`` is what ``python -m dp_jax.analysis`` calls. It rebuilds the
experiment from ``workdir/config.json`` exactly as :mod:`dp_jax.tasks.prune` does
(dataset, model, optimiser, the seed's init ``init_fn(fold_in(key(seed),
rng.INIT))``), and for every selected mask ``runs/<label>-seed<s>/masks/round_XXX.npz``:

  1. trains ``P`` copies from the mask's *starting point* -- the method's rewind
     point (init for k=0, the dense run's weights at step k otherwise, a fresh
     init for ``reinit``), masked -- with the config's training settings on the
     real training set (copy 0 retraces the run's own evaluation training);
  2. runs each selected analysis of :data:`dp_jax.analysis.registry.ANALYSES` on them
     (built in: instability -- interpolation between every pair of copies, barriers,
     layer-wise interpolation, L2 distances; the Hessian of the training loss at copy 0,
     and optionally at the start point; landscapes around the copies).

Per seed, an analysis may add a curve over the dense network's rewind steps k (instability:
its instability as a function of k); the Hamming distances between the methods' masks are
computed whenever several runs are selected. Outputs:
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
import numpy as np

from dp_jax import masks as masks_lib
from dp_jax.pruning.plan import Start
from dp_jax.analysis import context, registry, resume
from dp_jax.analysis.settings import Settings
from dp_jax.reports import analysis as report_lib
from dp_jax.rundir import lock as lock_lib
from dp_jax.rundir import paths as workdir_lib
from dp_jax.rundir import verified
from dp_jax.storage import fileio, integrity
from dp_jax.tasks import settings as settings_lib


tag = workdir_lib.analysis_stem  # file stem of one mask's results


def _digest(mask) -> str:
    h = hashlib.sha1()
    for k, v in sorted(masks_lib.to_flat(mask).items()):
        h.update(k.encode())
        h.update(np.packbits(v).tobytes())
    return h.hexdigest()


def _record_accuracy(workdir: str, label: str, seed: int, rnd: int) -> Optional[float]:
    rows = verified.run_records(workdir, label, seed)
    for r in rows:
        if r.get("round") == rnd:
            return r.get("test_accuracy")
    return None


def _parse_selection(workdir: str, cfg, runs, rounds, seed):
    """Check the selection; ``(todo, seeds, runs)``, todo = [(seed, label, round, mask path)]."""
    specs = context.specs_by_label(cfg)
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
            done = _finished(workdir, label, s)
            for rnd in rounds:
                if rnd in done:  # checked now, before hours of training
                    todo.append((s, label, rnd, verified.mask_file(workdir, label, s, rnd)))
                elif explicit:
                    path = workdir_lib.mask_path(workdir, label, s, rnd)
                    raise FileNotFoundError(f"no mask {path}; has the run finished that round?")
    if not todo:
        raise FileNotFoundError(f"no masks found under {workdir}/runs for runs={runs}, "
                                f"seeds={seeds}")
    return todo, seeds, runs


def _start_text(start, k: int) -> str:
    """How a round's training started, for its analysis files."""
    if start.reinit:
        return "reinit"
    if start.kind == "trained":
        return f"trained round {start.step}"  # learning-rate rewinding: the previous round
    return f"rewind k={k}"


def _finished(workdir: str, label: str, seed: int) -> set:
    """The rounds a run has finished: those of its records (a finished round whose mask is
    missing is then an error, not a skip), or the masks of a run made before it kept records."""
    return ({r["round"] for r in verified.run_records(workdir, label, seed)}
            or set(workdir_lib.list_masks(workdir, label, seed)))


def analyze_mask(ctx: context.Context, ss: context.SeedState, label: str, rnd: int, path: str) -> dict:
    """Every requested analysis of one mask; writes its analysis/*.json (and npz) files.

    A mask that another run shares with the same start point (round 0's dense
    mask, typically) reuses that run's results instead of recomputing them.

    Returns:
      ``{analysis: result}`` for the analyses run.
    """
    spec = ctx.specs[label]
    mask = masks_lib.load(path, ss.init["params"])
    variables, k, start_tag = ss.start_point(ctx, spec, rnd)
    digest = _digest(mask)
    meta = {"run": label, "seed": ss.seed, "round": rnd, "sparsity": masks_lib.sparsity(mask),
            "start": _start_text(start_tag, k), "start_step": k,
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
    stem = tag(label, ss.seed, rnd)
    return resume.write_results(ctx.workdir, label, ss.seed, rnd, ctx.digest, meta, results,
                                arrays, {a.name: a.extra_fields(stem) for a in ctx.analyses})


def _compute(ctx: context.Context, ss: context.SeedState, mask, variables: dict, k: int,
             start_tag: Start, first: Optional[dict] = None):
    """The selected analyses of one (start point, mask): ``(results, npz arrays by file-name
    parts)``.

    ``first``: the run's trained weights (copy 0), when its round checkpoint is kept.
    """
    if max(a.copies for a in ctx.analyses) == 1 and first is not None:
        copies, train_info = [first], {"copy0": "kept checkpoint"}  # nothing to train
    else:
        copies, train_info = ctx.copies(ss.seed, variables, mask, k, start_tag, first=first)
    point = registry.Point(mask=mask, variables=variables, copies=list(copies),
                           train_info=train_info)
    results, arrays = {}, {}
    for analysis in ctx.analyses:
        results[analysis.name], more = analysis.run(ctx, ss, point)
        arrays.update(more)
    return results, arrays


def mask_distances(ctx: context.Context, seeds, runs, rounds_by: dict) -> dict:
    """Hamming distance and IoU between the masks of every pair of runs, per seed and round."""
    out = []
    like = jax.eval_shape(ctx.setup.init_fn, jax.random.key(0))["params"]
    for s in seeds:
        for a, b in itertools.combinations(runs, 2):
            for rnd in sorted(set(rounds_by.get((s, a), ())) & set(rounds_by.get((s, b), ()))):
                pa, pb = (verified.mask_file(ctx.workdir, r, s, rnd) for r in (a, b))
                h = masks_lib.hamming(masks_lib.load(pa, like), masks_lib.load(pb, like))
                out.append({"seed": s, "round": rnd, "runs": [a, b], **h})
    return {"pairs": out}


def _stamps(adir: str) -> dict:
    """``{file: (inode, size, mtime)}`` of the analysis directory (an atomic write changes
    the inode)."""
    out = {}
    for f in os.listdir(adir):
        st = os.stat(os.path.join(adir, f))
        out[f] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return out


def _recording(workdir: str, fn: Callable, *args):
    """``fn(*args)``, then every file it wrote under ``analysis/`` recorded in the analysis
    manifest (a curve maker, a plugin's included, writes its own summary files)."""
    adir = workdir_lib.analysis_dir(workdir)
    before = _stamps(adir)
    out = fn(*args)
    for f, stamp in _stamps(adir).items():
        if before.get(f) != stamp and f != integrity.MANIFEST and \
                os.path.isfile(os.path.join(adir, f)):
            integrity.record(adir, f)
    return out


def select(analyses: Optional[Sequence[str]]) -> tuple:
    """The :class:`~dp_jax.analysis.registry.Analysis` objects named, in registry order
    (None: every registered analysis); a ValueError names unknown ones and the allowed."""
    names = tuple(registry.ANALYSES) if analyses is None else tuple(analyses)
    bad = [a for a in names if a not in registry.ANALYSES]
    if bad or not names:
        raise ValueError(f"--analyses: unknown {bad}; allowed: {', '.join(registry.ANALYSES)}")
    return tuple(a for a in registry.ANALYSES.values() if a.name in names)


def _rewind_steps(ctx: context.Context) -> list[int]:
    """The rewind steps k of the dense curves (checked against the run's length)."""
    settings = ctx.settings
    ks = (list(settings.k_values) if settings.k_values is not None
          else context.default_k_values(ctx))
    bad_k = [k for k in ks if not 0 <= k < ctx.setup.num_steps]
    if bad_k:
        raise ValueError(f"k_values {bad_k} outside 0..{ctx.setup.num_steps - 1} (training steps)")
    return ks


@lock_lib.holding("workdir")  # it writes analysis/, plots/ and report.md
def run(workdir: str, *, analyses: Optional[Sequence[str]] = None,
        runs: Optional[Sequence[str]] = None, rounds: Optional[Sequence[int]] = None,
        seed: Optional[int] = None, settings: Settings = Settings(),
        log: Callable[[str], None] = lambda m: None, plugins=None,
        trust_plugins: bool = False) -> dict:
    """Run the analyses on a finished workdir (see module doc), holding its lock.

    Args:
      workdir: a directory written by ``python -m dp_jax.main``.
      analyses: names in :data:`dp_jax.analysis.registry.ANALYSES`; default all of them.
      runs: run labels (e.g. ``imp_k0``, ``random``); default every run of the config.
      rounds: rounds to analyse; default every round whose mask exists.
      seed: one seed; default every seed of the config.
      settings: analysis knobs (:class:`Settings`).
      log: progress callback taking a message.
      plugins, trust_plugins: which plugin modules named by the workdir's config.json may be
        imported (:func:`dp_jax.tasks.settings.from_workdir`).

    Returns:
      ``{"results": {tag: {analysis: result}}, "rewind_curves": {seed: curve}, "wall_s"}``.
    """
    t_start = time.time()
    selected = select(analyses)
    settings.validate()
    cfg, _ = settings_lib.from_workdir(workdir, plugins=plugins, trust_plugins=trust_plugins)
    todo, seeds, run_labels = _parse_selection(workdir, cfg, runs, rounds, seed)
    ctx = context.Context(workdir, cfg, settings, selected, log)
    ks = _rewind_steps(ctx)
    curve_makers = [a for a in selected if a.rewind_curve is not None]
    os.makedirs(workdir_lib.analysis_dir(workdir), exist_ok=True)
    results, curves = {}, {}
    for s in seeds:
        mine = [t for t in todo if t[0] == s]
        need = {ctx.specs[label].rewind_step for _, label, _, _ in mine}
        if curve_makers:
            need |= set(ks)
        ss = context.SeedState(ctx, s, sorted(need))
        for _, label, rnd, path in mine:
            t0 = time.time()
            results[tag(label, s, rnd)] = r = analyze_mask(ctx, ss, label, rnd, path)
            parts = [a.summary(r[a.name]) for a in selected if a.name in r]
            log(" ".join([f"{tag(label, s, rnd)}:"] + [p for p in parts if p])
                + f" ({time.time() - t0:.1f} s)")
        for a in curve_makers:
            curves[s] = _recording(workdir, a.rewind_curve, ctx, ss, ks)
    rounds_by = {}
    for s, label, rnd, _ in todo:
        rounds_by.setdefault((s, label), []).append(rnd)
    if len(run_labels) > 1:
        fileio.write_json(workdir_lib.analysis_path(workdir, "masks.json"),
                          mask_distances(ctx, seeds, run_labels, rounds_by))
        integrity.record(workdir_lib.analysis_dir(workdir), "masks.json")
    report_lib.write(workdir)
    return {"results": results, "rewind_curves": curves, "wall_s": time.time() - t_start}
