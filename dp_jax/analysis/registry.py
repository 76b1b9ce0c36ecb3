"""The analyses of a mask, registered by name (the values of ``--analyses``).

An :class:`Analysis` computes its results for one (start point, mask) -- a :class:`Point`
with the copies trained from it -- given the workdir's :class:`~dp_jax.analysis.context.Context`
and the seed's :class:`~dp_jax.analysis.context.SeedState`. Its results are written to
``analysis/<name>_<stem>.json`` (plus npz arrays) by :mod:`dp_jax.tasks.analyze`; the report
section, if any, is registered in :mod:`dp_jax.reports.analysis`.

Built in, in this order: ``instability`` (linear mode connectivity between the copies, and
the dense network's curve against the rewind step k), ``hessian`` (the restricted Hessian at
copy 0 and optionally at the start point) and ``landscape`` (lines and planes around the
copies).
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from dp_jax import masks as masks_lib
from dp_jax import rng
from dp_jax.pruning.plan import Start
from dp_jax.analysis import hessian, instability, landscape, resume
from dp_jax.analysis.context import Context, SeedState
from dp_jax.analysis.settings import HESSIAN_POINTS
from dp_jax.rundir import paths as workdir_lib
from dp_jax.storage import fileio


@dataclasses.dataclass(frozen=True)
class Point:
    """One (start point, mask) and the copies trained from it: what an analysis works on."""
    mask: Any               # pytree of booleans shaped like the params
    variables: dict         # the start point ``{"params", "batch_stats"}``, not masked
    copies: Sequence[dict]  # trained copies; copy 0 is the run's own training
    train_info: dict        # how the copies were obtained (``copy0``: kept checkpoint | retrained)


def _no_summary(result: dict) -> str:
    return ""


def _no_fields(stem: str) -> dict:
    return {}


@dataclasses.dataclass(frozen=True)
class Analysis:
    """One analysis of a mask.

    ``run(ctx, ss, point)`` returns ``(result, arrays)``: a JSON-able dict, and npz arrays
    keyed by ``(prefix, suffix)`` of their file name around the mask's stem. ``copies`` is how
    many trained copies it reads (1: copy 0 alone, which the run's kept round checkpoint
    provides without training). ``summary(result)`` is its part of the one-line progress log
    ("" for none); ``extra_fields(stem)`` adds fields that depend on the file stem (results
    are shared between runs with the same mask, file names are not). ``rewind_curve(ctx, ss,
    ks)``, when set, runs once per seed after its masks, on the dense snapshots at every
    rewind step in ``ks``.
    """
    name: str
    run: Callable[[Context, SeedState, Point], tuple[dict, dict]]
    copies: int = 1
    summary: Callable[[dict], str] = _no_summary
    extra_fields: Callable[[str], dict] = _no_fields
    rewind_curve: Optional[Callable[[Context, SeedState, Sequence[int]], dict]] = None


def run_instability(ctx: Context, ss: SeedState, point: Point) -> tuple[dict, dict]:
    """Interpolation, barriers, layer-wise barriers and L2 distances between the copies."""
    settings, t0 = ctx.settings, time.time()
    # Pairs among the requested copies only; a third copy trained for the
    # landscape plane would triple the pairs otherwise.
    r = instability.analyze_copies(
        ctx.evaluator, list(point.copies[:settings.copies]), point.mask, ctx.x_eval, ctx.y_eval,
        alphas=ctx.alphas, bn_modes=settings.bn_modes, bn_batches=ss.bn_batches,
        with_layerwise=settings.layerwise, batches=ctx.eval_batches)
    r.update(wall_s=time.time() - t0, num_test_examples=int(ctx.x_eval.shape[0]),
             copies_training=point.train_info)
    return r, {}


def rewind_curve(ctx: Context, ss: SeedState, ks: Sequence[int]) -> dict:
    """Instability of the dense network started at each rewind step ``k``; writes its JSON."""
    t0 = time.time()
    settings = ctx.settings
    mask = masks_lib.ones_like(ss.init["params"])
    rows = []
    for k in ks:
        copies, _ = ctx.copies(ss.seed, ss.snapshots[k], mask, k, Start("rewind", k),
                               num=settings.copies)
        r = instability.analyze_copies(ctx.evaluator, copies[:settings.copies], mask,
                                       ctx.x_eval, ctx.y_eval,
                                       alphas=ctx.alphas, bn_modes=settings.bn_modes,
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
    fileio.write_json(workdir_lib.analysis_path(ctx.workdir,
                                                f"instability_dense_k_seed{ss.seed}.json"), out)
    return out


def run_hessian(ctx: Context, ss: SeedState, point: Point) -> tuple[dict, dict]:
    """Top eigenvalues, trace, diagonal and density of the Hessian restricted to the mask."""
    settings, t0 = ctx.settings, time.time()
    points = {"trained": point.copies[0],
              "start": {"params": masks_lib.apply(point.variables["params"], point.mask),
                        "batch_stats": point.variables.get("batch_stats", {})}}
    h, arrays = {}, {}
    for where in settings.hessian_at:
        p = points[where]
        engine = ctx.hessian_engine(p["params"])
        summary, diag = hessian.analyze(
            engine, p["params"], p["batch_stats"], point.mask, ss.hessian_x, ss.hessian_y,
            jax.random.fold_in(instability.analysis_key(ss.seed, rng.ANALYSIS_HESSIAN_PROBES),
                               HESSIAN_POINTS.index(where)),
            top_k=settings.top_k, lanczos_steps=settings.lanczos_steps,
            trace_probes=settings.trace_probes, slq_probes=settings.slq_probes,
            batch_size=settings.hessian_batch)
        h[where] = summary
        arrays[("hessian_", f"_{where}_diag.npz")] = {
            "diag": diag.astype(np.float32),
            "mask": np.asarray(engine.flatten(point.mask)).astype(bool)}
    r = {**h[settings.hessian_at[0]], "at": settings.hessian_at[0]}
    for where in settings.hessian_at[1:]:
        r[where] = h[where]
    r["wall_s"] = time.time() - t0
    r["trained_weights"] = point.train_info.get("copy0", "retrained")
    return r, arrays


def run_landscape(ctx: Context, ss: SeedState, point: Point) -> tuple[dict, dict]:
    """Loss along copy 0 -> copy 1, on the plane through three copies and along random
    filter-normalised directions around copy 0 (the directions are saved as npz)."""
    settings, t0 = ctx.settings, time.time()
    bn = {"bn_mode": settings.bn_modes[0], "bn_batches": ss.bn_batches}
    key = instability.analysis_key(ss.seed, rng.ANALYSIS_LANDSCAPE_DIRS)
    r, dirs = landscape.analyze(
        ctx.evaluator, point.copies, point.mask, ss.land_x, ss.land_y, key,
        grid=settings.landscape_grid, line_points=settings.landscape_points,
        span=settings.landscape_span, **bn)
    arrays = {("landscape_", "_directions.npz"): landscape.directions_arrays(
        dirs, seed=ss.seed, purpose=rng.ANALYSIS_LANDSCAPE_DIRS)}
    r.update(wall_s=time.time() - t0, bn_mode=bn["bn_mode"] if ctx.has_bn else "none")
    return r, arrays


ANALYSES: dict[str, Analysis] = {}
_BUILTIN: set = set()
# rundir.paths.parse_analysis_file reads the analysis back from a file name up to the first
# "_", and "done_<stem>.json" records finished masks (analysis.resume).
_NAME = re.compile(r"[a-z]+")
_RESERVED = {resume.DONE}


def register(analysis: Analysis) -> Analysis:
    """Add ``analysis``; a name already registered (built in or not) is refused, and so is a
    name other than lowercase letters (its files are ``<name>_<stem>.json``)."""
    name = analysis.name
    if name in ANALYSES:
        raise ValueError(f"analysis {name!r} is already registered"
                         + (" (built in)" if name in _BUILTIN else ""))
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name in _RESERVED:
        raise ValueError(f"analysis name {name!r} is invalid; allowed: lowercase letters a-z, "
                         f"not {' | '.join(sorted(_RESERVED))}")
    if analysis.copies < 1:
        raise ValueError(f"analysis {name!r}: copies={analysis.copies} is invalid; allowed: "
                         "an integer >= 1")
    ANALYSES[name] = analysis
    return analysis


def get(name: str) -> Analysis:
    """The analysis ``name`` (a ValueError names the allowed ones)."""
    if name not in ANALYSES:
        raise ValueError(f"analysis {name!r} is unknown; allowed: " + " | ".join(ANALYSES))
    return ANALYSES[name]


for _a in (
        Analysis("instability", run_instability, copies=2,
                 summary=lambda r: f"barrier {100 * r['barrier']:.2f} pp",
                 rewind_curve=rewind_curve),
        Analysis("hessian", run_hessian, copies=1,
                 summary=lambda r: f"lambda_max {r['top_eigenvalues'][0]:.4g}"),
        Analysis("landscape", run_landscape, copies=3,  # the plane through three copies
                 extra_fields=lambda stem: {
                     "directions_file": f"landscape_{stem}_directions.npz"})):
    register(_a)
    _BUILTIN.add(_a.name)
