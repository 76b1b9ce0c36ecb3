"""The distillation task and the hook Distilled Pruning uses.

``run(config, workdir)`` (``config.task == 'distill'``): distillation (``distill.method``: MTT
with its experts, gradient matching or distribution matching) -> evaluation, writing the
run-directory contract: config.json, metrics.jsonl, experts/ (MTT's buffer, unless
``distill.buffer_dir`` points elsewhere), checkpoints/distill/, distilled.npz, distilled.png,
summary.json and report.md.

``ensure_distilled(config, workdir, dataset)``: the distilled set for a pruning run, from
``distill.path`` if set, else ``<workdir>/distilled.npz`` if present, else by distilling into
``workdir`` (resuming whatever part already exists).
"""

from __future__ import annotations

import os
import time
from typing import Optional

from absl import logging

from dp_jax.storage import integrity
from dp_jax.storage import fileio
from dp_jax import rng
from dp_jax.rundir import lock as lock_lib
from dp_jax.rundir import paths as workdir_lib
from dp_jax.data import describe_preprocessing, load_dataset
from dp_jax.distill import config as config_lib
from dp_jax.distill import sets as dist_lib
from dp_jax.distill import evaluate as eval_lib
from dp_jax.distill import experts as experts_lib
from dp_jax.distill import registry as distill_registry
from dp_jax.distill.loop import run_distillation

import jax
from dp_jax.tasks import settings as settings_lib
from dp_jax.rundir.metrics import MetricsLog
from dp_jax.reports import curves


def _buffer_dir(config, workdir: str) -> str:
    return config.distill.buffer_dir or workdir_lib.experts_dir(workdir)


def _no_experts() -> dict:
    """The expert cost of gm and dm, which train none (a fresh dict: callers may add to it)."""
    return {"examples": 0, "wall_s": 0.0, "cpu_s": 0.0}


# The evaluation key of each random-subset control, by name: the keys are fixed per purpose
# (0 = the distilled set, 2 = the full-data baseline), so adding a control changes no other.
_RANDOM_EVAL_KEYS = {"random": 1, "random_stored": 3}


def build_method(config, dataset, workdir: str, *, mask=None, log=lambda **kw: None):
    """``(method, expert cost)`` for ``config.distill.method``; a distiller that matches expert
    trajectories (MTT) trains/resumes its experts first, the others need none (cost 0)."""
    distiller = distill_registry.get(config.distill.method)
    if not distiller.needs_experts:
        return distiller.build(config, dataset, trajectories=None, mask=mask), _no_experts()
    buf_dir = _buffer_dir(config, workdir)
    buf = experts_lib.train_experts(config, dataset, buf_dir, log=log)
    traj = experts_lib.load_trajectories(config, dataset, buf_dir)
    return distiller.build(config, dataset, trajectories=traj, mask=mask), buf.cost()


def distill_into(config, workdir: str, dataset, *, mask=None, progress: bool = True,
                 log=lambda **kw: None, evaluator=None) -> dist_lib.DistilledSet:
    """Distil with ``distill.method`` (MTT: experts first), resuming whatever exists, and write
    distilled.npz and distilled.png."""
    d = config.distill
    method, cost = build_method(config, dataset, workdir, mask=mask, log=log)
    res = run_distillation(config, method, workdir, log=log, evaluator=evaluator,
                           progress=progress)
    ds = dist_lib.DistilledSet(
        images=res.images, labels=res.labels, lr=res.lr, preprocessing=dataset.preprocessing,
        dataset=dataset.name, stored_images=res.stored_images, stored_labels=res.stored_labels,
        factor=int(d.factor),
        meta={"model": experts_lib.model_fields(config.model), "distill": d.to_dict(),
              "seed": int(config.seed), "final_loss": res.last_loss,
              "preprocessing": describe_preprocessing(dataset.preprocessing),
              "masked": mask is not None},
        cost={"expert_examples": int(cost["examples"]), "expert_wall_s": float(cost["wall_s"]),
              "expert_cpu_s": float(cost.get("cpu_s", 0.0)),
              "distill_examples": int(res.examples), "distill_wall_s": float(res.wall_s),
              "distill_cpu_s": float(res.cpu_s)})
    _save_recorded(workdir, ds)
    dist_lib.save_grid(workdir_lib.distilled_grid_path(workdir), ds,
                       num_classes=dataset.num_classes)
    return ds


def _save_recorded(workdir: str, ds) -> None:
    """Write the workdir's distilled.npz and record its checksum (a later reuse verifies it)."""
    path = workdir_lib.distilled_path(workdir)
    dist_lib.save_distilled(path, ds)
    integrity.record(workdir, os.path.basename(path))


def ensure_distilled(config, workdir: str, dataset, *,
                     log=None) -> dist_lib.DistilledSet:
    """The distilled set Distilled Pruning trains on, with its cost accounting.

    Precedence: ``config.distill.path`` if set; else ``<workdir>/distilled.npz`` if it exists;
    else ``distill.method`` (MTT with experts, gm, dm) into ``workdir`` (resumable). The set is
    checked against ``dataset`` (same dataset and preprocessing) with :func:`check_compatible`.
    ``.cost`` holds
    ``{expert_examples, expert_wall_s, distill_examples, distill_wall_s}``.
    """
    config_lib.validate(config.distill)
    path = config.distill.path or workdir_lib.distilled_path(workdir)
    if config.distill.path or os.path.exists(path):
        why = None if config.distill.path or not integrity.has_records(workdir) else \
            integrity.problem(workdir, os.path.basename(path))
        if why is not None:  # the workdir made it: a changed file is not the set DP ran on
            raise ValueError(f"distilled set {path} is {why}; delete it to distil again, or "
                             "set distill.path to use a set from elsewhere")
        ds = dist_lib.load_distilled(path)
        dist_lib.check_compatible(ds, dataset)
        return ds
    config_lib.validate_with_data(config.distill, dataset)
    metrics = workdir_lib.metrics_path(workdir)
    log = log or (lambda **kw: fileio.append_jsonl(metrics, kw))
    return distill_into(config, workdir, dataset, log=log)


def run(config, workdir: str, *, restart_changed: bool = False, progress: bool = True) -> dict:
    """The 'distill' task: distillation -> evaluation; returns summary.json's content.

    Nothing is written before the config, the data and the workdir's identity are checked;
    with ``restart_changed`` a workdir made by other settings has its distillation moved to
    ``superseded/`` and redone.
    """
    t_start = time.time()
    settings = settings_lib.parse(config)
    workdir_lib.check_writable(workdir)
    dataset = load_dataset(settings.data, seed=settings.seed)
    config_lib.validate_with_data(settings.distill, dataset)
    raw = config.to_dict()
    changed = workdir_lib.check_identity(workdir, raw, restart=restart_changed)
    os.makedirs(workdir, exist_ok=True)
    with lock_lib.Lock(workdir):
        if changed:
            workdir_lib.supersede(workdir, [], distill=True)
        fileio.write_json(workdir_lib.config_path(workdir),
                          dict(raw, data_source=dataset.source or dataset.name))
        return _run_locked(settings, workdir, dataset, t_start, progress)


def _run_locked(config, workdir: str, dataset, t_start: float, progress: bool) -> dict:
    sink = MetricsLog(workdir, config.metrics)
    try:
        return _distill_and_evaluate(config, workdir, dataset, t_start, sink, progress)
    finally:
        sink.close()


def _distill_and_evaluate(config, workdir: str, dataset, t_start: float, sink,
                          progress: bool = True) -> dict:
    d = config.distill

    def log(**kw):
        sink(**kw)
        if kw.get("phase") == "experts":
            logging.info("expert %s epoch %s: %s", kw.get("expert"), kw.get("epoch"),
                         {k: v for k, v in kw.items() if k in ("loss", "accuracy",
                                                               "test_accuracy")})

    evaluator = eval_lib.make_evaluator(config, dataset)
    phases = {"load_s": time.time() - t_start}
    t0 = time.time()
    if d.path:
        ds = dist_lib.load_distilled(d.path)
        dist_lib.check_compatible(ds, dataset)
        _save_recorded(workdir, ds)
        dist_lib.save_grid(workdir_lib.distilled_grid_path(workdir), ds,
                           num_classes=dataset.num_classes)
    else:
        ds = distill_into(config, workdir, dataset, log=log, evaluator=evaluator,
                          progress=progress)
    phases["experts_and_distill_s"] = time.time() - t0

    key = jax.random.fold_in(experts_lib.distill_key(config), rng.DISTILL_EVAL)
    results = {}
    t0 = time.time()
    results["distilled"] = evaluator.run(ds.images, ds.labels, ds.lr, jax.random.fold_in(key, 0),
                                         num_models=int(d.eval_models))
    log(phase="final_eval", set="distilled", **results["distilled"])
    if d.eval_random:
        # Same number of training images; with multi-formation (factor > 1) also the same
        # storage (as many full-size real images as stored ones), IDC's comparison.
        sizes = {"random": len(ds)}
        if ds.stored_images is not None and len(ds.stored_images) != len(ds):
            sizes["random_stored"] = len(ds.stored_images)
        for name, size in sizes.items():
            xr, yr = eval_lib.random_subset(dataset, size, seed=config.seed)
            results[name] = evaluator.run(xr, yr, float(d.lr_init),
                                          jax.random.fold_in(key, _RANDOM_EVAL_KEYS[name]),
                                          num_models=int(d.eval_models))
            results[name]["lr"] = float(d.lr_init)
            log(phase="final_eval", set=name, **results[name])
    if d.eval_full_epochs:
        results["full"] = eval_lib.full_data_baseline(
            config, dataset, jax.random.fold_in(key, 2), num_models=int(d.eval_full_models),
            epochs=int(d.eval_full_epochs))
        log(phase="final_eval", set="full", **results["full"])
    phases["eval_s"] = time.time() - t0
    summary = {"task": "distill", "method": d.method, "dataset": dataset.name,
        "model": experts_lib.model_fields(config.model), "images": len(ds),
        "stored_images": int(ds.stored_images.shape[0]), "ipc": int(d.ipc),
        "factor": int(d.factor), "lr": ds.lr, "preprocess": dataset.preprocessing["kind"],
        "data_source": dataset.source, "results": results, "cost": ds.cost,
        "phases_s": phases, "wall_s": time.time() - t_start,
        "devices": [str(x) for x in jax.devices()], "backend": jax.default_backend()}
    fileio.write_json(workdir_lib.summary_path(workdir), summary)
    write_report(workdir, summary, config)
    return summary


def _fmt(r: Optional[dict]) -> str:
    if not r:
        return "n/a"
    return f"{100 * r['accuracy_mean']:.2f} ± {100 * r['accuracy_std']:.2f}"


def write_report(workdir: str, summary: dict, config) -> None:
    """A short report.md next to summary.json."""
    d = config.distill
    r = summary["results"]
    c = summary["cost"]
    lines = [
        f"# Distillation: {summary['dataset']}, {summary['model']['name']}",
        "",
        f"{summary['stored_images']} stored images ({summary['ipc']}/class, factor "
        f"{summary['factor']}) -> {summary['images']} training images; "
        f"{'learned ' if d.method == 'mtt' else ''}step size "
        f"{summary['lr']:.4g}; preprocessing `{summary['preprocess']}`.",
        "",
        "| training set | images | test accuracy % (mean ± std) | models |",
        "|---|---|---|---|",
        f"| distilled | {summary['images']} | {_fmt(r.get('distilled'))} | {d.eval_models} |",
        f"| random real subset (stratified) | {summary['images']} | {_fmt(r.get('random'))} | "
        f"{d.eval_models} |",
        *([f"| random real subset, same storage | {summary['stored_images']} | "
           f"{_fmt(r['random_stored'])} | {d.eval_models} |"] if 'random_stored' in r else []),
        f"| full training set ({d.eval_full_epochs} epochs) | all | {_fmt(r.get('full'))} | "
        f"{d.eval_full_models} |",
        "",
        f"Evaluation: SGD momentum {d.eval_momentum}, weight decay {d.eval_weight_decay}, "
        f"{d.eval_epochs} epochs, batch {d.eval_batch_size}, lr x0.1 at half, augmentation "
        f"`{d.eval_augment}`; the random subset uses lr {d.lr_init}.",
        "",
        distill_registry.get(d.method).describe(d),
        "",
        f"Cost: experts {c.get('expert_examples', 0):,} examples / "
        f"{c.get('expert_wall_s', 0):.0f} s wall / {c.get('expert_cpu_s', 0):.0f} s CPU; "
        f"distillation {c.get('distill_examples', 0):,} "
        f"{'synthetic' if d.method == 'mtt' else 'real + synthetic'} examples / "
        f"{c.get('distill_wall_s', 0):.0f} s wall / {c.get('distill_cpu_s', 0):.0f} s CPU; "
        f"total wall "
        f"{summary['wall_s']:.0f} s.",
        "",
        "![distilled images](distilled.png)",
        ""]
    if curves.plot_distillation(fileio.read_jsonl(workdir_lib.metrics_path(workdir)),
                                workdir_lib.plot_path(workdir, "distillation_loss.png")):
        lines += ["Matching loss per iteration (TensorBoard: `tensorboard --logdir "
                  f"{workdir_lib.tensorboard_dir(workdir)}`):", "",
                  "![distillation loss](plots/distillation_loss.png)", ""]
    fileio.atomic_write_bytes(workdir_lib.report_path(workdir), "\n".join(lines).encode())
