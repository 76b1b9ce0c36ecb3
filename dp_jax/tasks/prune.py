"""One experiment: methods x seeds of pruning runs on one dataset and model.

``run(config, workdir)`` is the prune task (``dp_jax.run`` and ``dp-jax run`` call it). It validates
the config, trains each seed's dense network once (shared by every method of
that seed: round 0, IMP's first training and its rewind points; dp_jax.pruning.dense), runs each
method's rounds (seed after seed, or all seeds as one program with
``parallel.vmap_seeds``: dp_jax.pruning.seeds), and writes the run-directory contract (README "Run directory"; every
path is owned by dp_jax.rundir.paths):
config.json, metrics.jsonl, rounds.jsonl, runs/<label>-seed<s>/{masks,checkpoints},
summary.json, report.md and plots/.

Resume precedence: a complete checkpoint in the workdir wins; otherwise the run
starts from its init. Re-running the same command on a finished workdir only
rewrites the report.
"""

from __future__ import annotations

import contextlib
import copy
import os
import time

import jax
import jax.numpy as jnp
from absl import logging

from dp_jax import methods
from dp_jax import rng
from dp_jax.data import registry as data_registry
from dp_jax.distill import sets as distill_sets
from dp_jax.pruning import dense as dense_lib
from dp_jax.pruning import records
from dp_jax.pruning import rounds as prune_lib
from dp_jax.pruning import seeds as seed_groups
from dp_jax.pruning import setup as setup_lib
from dp_jax.pruning.plan import Distilled, parse_evaluate, rounds_to_train
from dp_jax.pruning.settings import Experiment
from dp_jax.reports import pruning as report
from dp_jax.rundir import lock as lock_lib
from dp_jax.rundir import paths as workdir_lib
from dp_jax.rundir.metrics import MetricsLog
from dp_jax.storage import fileio
from dp_jax.system import compile_time, distributed
from dp_jax.system.progress import Progress
from dp_jax.tasks import distill as distill_task
from dp_jax.tasks import settings as settings_lib
from dp_jax.training import small_set


def run(config, workdir: str, *, restart_changed: bool = False, progress: bool = True) -> dict:
    """Run the experiment described by ``config`` into ``workdir``; returns summary.json's content.

    Nothing is written until the config, the data and the workdir's identity have been
    checked; one process at a time may use a workdir (:class:`dp_jax.rundir.lock.Lock`). With
    ``restart_changed``, runs whose settings changed are moved aside and run afresh.
    """
    t_start = time.time()
    # Before anything touches a JAX backend (the checks below count devices).
    distributed.initialize(settings_lib.build(config).parallel)
    settings = settings_lib.parse(config)
    workdir_lib.check_writable(workdir)
    dataset = setup_lib.load_data(settings)
    settings_lib.validate_with_data(settings, dataset)
    raw = dict(config.to_dict(), **{workdir_lib.CONTENT: content_hashes(settings, dataset)})
    changed = workdir_lib.check_identity(workdir, raw, restart=restart_changed)
    os.makedirs(workdir, exist_ok=True)
    lock = lock_lib.Lock(workdir) if distributed.is_main_process() else contextlib.nullcontext()
    with lock:
        # Again under the lock: another process may have written the workdir since.
        changed = workdir_lib.check_identity(workdir, raw, restart=restart_changed)
        if changed and distributed.is_main_process():
            _supersede_changed(workdir, changed, settings.specs)
        fileio.write_json(workdir_lib.config_path(workdir), dict(
            recorded_config(workdir, raw, settings), data_source=data_source(dataset)))
        return _run_locked(settings, raw, workdir, dataset, t_start, progress)


def content_hashes(settings: Experiment, dataset) -> dict:
    """SHA-256 of the files the config names by path (``data.name``'s data file,
    ``distill.path`` when a method reads it), nested by the config field naming them: they
    enter the run identity. The distilled set is read and checked here, before anything is
    written."""
    out = {}
    data_hash = data_registry.content_fingerprint(settings.data)
    if data_hash is not None:
        out["data"] = {"name": data_hash}
    path = settings.distill.path
    if path and any(methods.get(s.name).needs_distilled for s in settings.specs):
        try:
            distill_sets.check_compatible(distill_sets.load_distilled(path), dataset)
        except ValueError as e:
            raise ValueError(f"config.distill.path={path!r}: {e}") from None
        out["distill"] = {"path": data_registry.file_sha256(path)}
    return out


# ---- config.json: every run the workdir holds -----------------------------------------------


def recorded_config(workdir: str, raw: dict, settings: Experiment) -> dict:
    """The config config.json records: this run's, extended by the workdir's earlier
    config.json with what the workdir still holds (methods with a run directory, seeds,
    rounds, plugin modules), so that export, analyze and the report reach every run, while
    this run runs only what it names. A method entry whose label would change under this
    run's settings (``imp`` after ``prune.rewind_step`` changed) is written out in full."""
    path = workdir_lib.config_path(workdir)
    present = {label for label, _ in workdir_lib.list_runs(workdir)}
    if not os.path.exists(path) or not present - {workdir_lib.DENSE}:
        return raw
    old = fileio.read_json(path)
    out = copy.deepcopy(raw)
    out["seeds"] = max(int(old.get("seeds", 1)), int(raw["seeds"]))
    old_prune = old.get("prune", {})
    out["prune"]["rounds"] = max(int(old_prune.get("rounds", 0)), int(raw["prune"]["rounds"]))
    for section in ("prune", "data", "model"):
        out[section]["plugins"] = ",".join(_union(
            _items(old.get(section, {}).get("plugins")), _items(raw[section]["plugins"])))
    entries = _entries(old, _items(old_prune.get("method")), present) + [
        (spec.label, text, method_entry(spec))
        for spec, text in zip(settings.specs, _items(raw["prune"]["method"]))]
    final = settings_lib.build(out)
    texts, seen = [], set()
    for label, text, full in entries:
        if (label or text) not in seen:
            seen.add(label or text)
            texts.append(text if label is None or _label(text, final) == label else full)
    out["prune"]["method"] = ",".join(texts)
    return out


def method_entry(spec) -> str:
    """The ``prune.method`` entry of ``spec`` with every option written out
    (``imp:k=0``): it names the same run whatever the other settings say."""
    flags = {o.name for o in methods.get(spec.name).options if o.flag}
    opts = [k if k in flags else f"{k}={v}" for k, v in spec.options
            if not (k in flags and not v)]
    return spec.name + (":" + ";".join(opts) if opts else "")


def _entries(config: dict, texts: list, present: set) -> list:
    """``(label, entry as written, entry in full)`` of the old config.json's methods that
    still have a run directory. A method this process has not registered (a plugin it did not
    load) has label None and is kept as written."""
    try:
        settings = settings_lib.build(config)
    except ValueError:
        settings = None
    out = []
    for text in texts:
        try:
            spec = methods.parse(text, settings, check=False)[0]
        except (ValueError, AttributeError):  # unregistered, or no settings to read defaults
            out.append((None, text, text))
            continue
        if spec.label in present:
            out.append((spec.label, text, method_entry(spec)))
    return out


def _label(text: str, settings):
    try:
        return methods.parse(text, settings, check=False)[0].label
    except ValueError:
        return None


def _items(text) -> list:
    return [t.strip() for t in str(text or "").split(",") if t.strip()]


def _union(*lists) -> list:
    return list(dict.fromkeys(x for xs in lists for x in xs))


def small_set_labels(specs) -> set:
    """Labels of the runs that read the ``dp``/``distill`` sections (reinit of one included)."""
    out: set = set()
    for s in specs:
        m = methods.get(s.name)
        if m.needs_dp or m.needs_distilled or (s.source is not None and s.source in out):
            out.add(s.label)
    return out


def _supersede_changed(workdir: str, changed: dict, specs) -> None:
    """Move aside every finished run (and the distilled set) that the ``changed`` fields affect."""
    small = small_set_labels(specs)
    known = {s.label for s in specs}
    only_small = all(k.startswith(workdir_lib.SMALL_SET) for k in changed)
    # A run of a method no longer listed cannot be classified: it moves whenever anything changed.
    runs = [(label, seed) for label, seed in workdir_lib.list_runs(workdir)
            if not only_small or label in small or (label not in known
                                                    and label != workdir_lib.DENSE)]
    distill = any(k.startswith(workdir_lib.DISTILL_INPUTS) for k in changed)
    dest = workdir_lib.supersede(workdir, runs, distill=distill)
    logging.warning("settings changed (%s): moved %d run(s)%s to %s; they run afresh",
                    ", ".join(changed), len(runs), " and the distilled set" if distill else "",
                    dest)


def data_source(dataset) -> str:
    """Where ``dataset`` was read from (a directory, file or TFDS name)."""
    return getattr(dataset, "source", "") or dataset.name


def _run_locked(config: Experiment, raw: dict, workdir, dataset, t_start, progress) -> dict:
    sink = MetricsLog(workdir, config.metrics)
    try:
        return _run_all(config, raw, workdir, dataset, t_start, sink, progress)
    finally:
        sink.close()


def _run_all(config: Experiment, raw: dict, workdir, dataset, t_start, sink,
             show_progress: bool = True) -> dict:
    specs = config.specs
    setup = setup_lib.build_setup(config, dataset, log=sink)
    seeds = [config.seed + i for i in range(config.seeds)]
    total_rounds = len(seeds) * len(specs) * (config.prune.rounds + 1)
    progress = Progress(total_rounds, desc="rounds", enabled=show_progress)
    log_metrics = setup.log_epoch
    setup.log_epoch = lambda **kw: (log_metrics(**kw), progress.epoch(kw))
    phases = {"load_s": time.time() - t_start, "dense_s": 0.0}
    distilled = None
    if any(methods.get(s.name).needs_distilled for s in specs):
        t0 = time.time()
        distilled, cost = prepare_distilled(config, workdir, dataset, setup, progress,
                                            sink=sink)
        phases["distill_s"] = time.time() - t0
        phases.update(cost)
    small = small_set_labels(specs)
    for seed in seeds:
        for label in [workdir_lib.DENSE] + [s.label for s in specs]:
            workdir_lib.check_run_identity(workdir, label, seed, workdir_lib.run_fields(
                raw, label, seed, small_set=label in small))
    on_round = lambda r: (progress.update(r), records.merge_rounds(workdir))  # noqa: E731
    rewind = [s.rewind_step for s in specs]
    vmapped = seed_groups.enabled(config.parallel.vmap_seeds, len(seeds),
                                  stream=setup.stream is not None,
                                  data_parallel=bool(config.parallel.data_parallel))

    def timed(name, fn, *args, **kw):
        t0 = time.time()
        out = fn(*args, **kw)
        phases[name] = phases.get(name, 0.0) + time.time() - t0
        return out

    if vmapped:  # each method's rounds for all seeds at once (dp_jax/pruning/seeds.py)
        denses = timed("dense_s", dense_lib.dense_runs, setup, workdir, seeds, rewind)
        for seed, dense in zip(seeds, denses):
            logging.info("seed %d dense test accuracy %.4f", seed,
                         dense["record"]["test_accuracy"])
        for spec in specs:
            timed(f"{spec.label}_s", run_method_seeds, setup, workdir, spec, seeds, denses,
                  on_round, config=config, distilled=distilled)
            distributed.sync(f"dp_jax-{spec.label}")
    else:
        for seed in seeds:
            dense = timed("dense_s", dense_lib.dense_run, setup, workdir, seed, rewind)
            logging.info("seed %d dense test accuracy %.4f", seed,
                         dense["record"]["test_accuracy"])
            for spec in specs:
                timed(f"{spec.label}_s", run_method, setup, workdir, spec, seed, dense,
                      on_round=on_round, config=config, distilled=distilled)
                # Process 0 wrote this run's files; other hosts read them (reinit, summary)
                # after it.
                distributed.sync(f"dp_jax-{spec.label}-seed{seed}")
    progress.close()
    summary = summarize(workdir, phases, time.time() - t_start, data_source(dataset),
                        vmap_seeds=vmapped)
    if distributed.is_main_process():
        report.write_report(workdir)
    return summary


def prepare_distilled(config, workdir, dataset, setup, progress=None, *, sink=None):
    """The distilled set (made, reused or loaded) and DP's compiled inner loop.

    Returns ``(Distilled, cost)`` where ``cost`` holds the distillation
    and expert-training examples and wall time (reported apart from the mask search).
    """
    metrics = workdir_lib.metrics_path(workdir)

    def log(**kw):  # distillation metrics go to metrics.jsonl (+ viewers) and the progress line
        sink(**kw) if sink is not None else fileio.append_jsonl(metrics, kw)
        if progress is not None:
            progress.note(", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                    for k, v in kw.items() if k in ("phase", "expert", "epoch",
                                                                     "iteration", "loss")))
    dset = distill_task.ensure_distilled(config, workdir, dataset, log=log)
    distill_sets.check_compatible(dset, dataset)
    lr = float(config.dp.lr) if config.dp.lr > 0 else float(dset.lr)
    inner = small_set.setup_inner_train(setup, config.dp, lr, len(dset))
    x, y = jnp.asarray(dset.images), jnp.asarray(dset.labels)
    return Distilled(x, y, inner, float(dset.lr)), dict(dset.cost)


def _plan(setup, workdir, spec, seed, dense, config, distilled):
    """The method's plan for one seed's run."""
    method = methods.get(spec.name)
    if method.needs_distilled and distilled is None:
        raise ValueError(f"{spec.label} needs a distilled set")
    ctx = methods.Context(setup=setup, workdir=workdir, seed=seed, seed_key=rng.seed_key(seed),
                          dense=dense, config=config, distilled=distilled)
    return method.plan(spec, ctx)


def run_method(setup, workdir, spec, seed, dense, on_round=lambda r: None, *, config=None,
               distilled=None) -> list:
    """Run (or resume) one method for one seed; returns its records.

    ``distilled`` is a :class:`~dp_jax.pruning.plan.Distilled` for methods that need it
    (see :func:`prepare_distilled`).
    """
    plan = _plan(setup, workdir, spec, seed, dense, config, distilled)
    run = prune_lib.Run(workdir, spec, seed, keep=config.checkpoint.keep)
    try:
        return prune_lib.run_rounds(setup, run, dense, seed_key=rng.seed_key(seed),
                                    next_mask=plan.next_mask, start_point=plan.start_point,
                                    search_examples=plan.search_examples,
                                    uses_trained=plan.uses_trained,
                                    trains=_trains(plan, spec, config), on_round=on_round)
    finally:
        run.close()


def _trains(plan, spec, config):
    """``round -> bool``: the rounds this run trains (``prune.evaluate``, checked at parse)."""
    return rounds_to_train(plan, methods.get(spec.name).start(spec), config.prune.rounds,
                           parse_evaluate(config.prune.evaluate, config.prune.rounds))


def run_method_seeds(setup, workdir, spec, seeds, denses, on_round=lambda r: None, *,
                     config=None, distilled=None) -> list:
    """:func:`run_method` for every seed, each round's trainings as one vmapped program."""
    plans = [_plan(setup, workdir, spec, s, d, config, distilled) for s, d in zip(seeds, denses)]
    runs = [prune_lib.Run(workdir, spec, s, keep=config.checkpoint.keep) for s in seeds]
    try:
        return seed_groups.run_rounds_seeds(setup, runs, denses, plans, width=len(seeds),
                                            trains=_trains(plans[0], spec, config),
                                            on_round=on_round)
    finally:
        for r in runs:
            r.close()


def summarize(workdir: str, phases: dict, wall_s: float, source: str = "", *,
              vmap_seeds: bool = False) -> dict:
    """Write summary.json: final figures per method, dense accuracy and compute per phase."""
    rows = records.merge_rounds(workdir)
    methods = records.method_figures(rows)
    summary = {"methods": methods, "phases_s": phases, "wall_s": wall_s, "data_source": source,
               "compile_s": compile_time.seconds(), "compile_cache": compile_time.cache_counts(),
               "devices": [str(d) for d in jax.devices()], "backend": jax.default_backend(),
               "vmap_seeds": bool(vmap_seeds)}
    fileio.write_json(workdir_lib.summary_path(workdir), summary)
    return summary
