"""Where the config stops: :func:`parse` checks every field once (each error names the field and
the allowed values) and returns the typed settings the library reads
(:class:`dp_jax.pruning.settings.Experiment`); :func:`validate_with_data` runs once the dataset
is known and before any training.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Optional

import jax
from absl import logging

from dp_jax import distill
from dp_jax import masks as masks_lib
from dp_jax import methods
from dp_jax.config import defaults
from dp_jax.config import files as config_files
from dp_jax.data import DataSpec, preprocess
from dp_jax.data import registry as data_registry
from dp_jax.distill.settings import DistillSettings
from dp_jax.models import MODELS, ModelSpec, create_model, init_variables
from dp_jax.pruning import seeds as seed_groups
from dp_jax.pruning.plan import parse_evaluate, remaining_per_round
from dp_jax.pruning.settings import CheckpointSettings, Experiment, PruneSettings
from dp_jax.rundir import paths as workdir_lib
from dp_jax.rundir.metrics import MetricsSettings
from dp_jax.storage import fileio
from dp_jax.system.distributed import ParallelSettings
from dp_jax.training import optimizers, precision
from dp_jax.training import trainer as train_lib
from dp_jax.training.settings import DPSettings, TrainSettings

PREPROCESS = preprocess.PREPROCESS_KINDS


def _need(cond: bool, field: str, allowed: str, value) -> None:
    if not cond:
        raise ValueError(f"config.{field}={value!r} is invalid; allowed: {allowed}")


def _fractions(values) -> bool:
    """A tuple of numbers in (0, 1) (a string or a number alone is not)."""
    return isinstance(values, (tuple, list)) and all(
        isinstance(f, (int, float)) and not isinstance(f, bool) and 0 < f < 1 for f in values)


def _finite(section, prefix: str = "config") -> None:
    """Every float field of the config is finite (``inf`` would pass any ``> 0`` check)."""
    for key, value in section.items():
        name = f"{prefix}.{key}"
        if hasattr(value, "items"):
            _finite(value, name)
        elif isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{name}={value!r} is invalid; allowed: a finite number")
        elif isinstance(value, (tuple, list)) and any(
                isinstance(v, float) and not math.isfinite(v) for v in value):
            raise ValueError(f"{name}={value!r} is invalid; allowed: finite numbers")


def _validate_metrics(m: MetricsSettings) -> None:
    """The ``metrics`` section."""
    for f in ("tensorboard", "wandb"):
        _need(isinstance(getattr(m, f), bool), f"metrics.{f}", "True | False", getattr(m, f))
    _need(isinstance(m.wandb_project, str) and m.wandb_project,
          "metrics.wandb_project", "a non-empty string", m.wandb_project)
    if m.wandb:
        import importlib.util
        _need(importlib.util.find_spec("wandb") is not None, "metrics.wandb",
              "False, or True with the wandb package installed (pip install wandb)", True)


def _validate_data(d) -> None:
    """The ``data`` section."""
    name = d.name
    source, _ = data_registry.resolve(name)  # a ValueError names the allowed forms
    _need(d.preprocess in PREPROCESS, "data.preprocess", " | ".join(PREPROCESS), d.preprocess)
    _need(d.train_size >= 0, "data.train_size", "0 (all) or a positive number of examples",
          d.train_size)
    classes = d.classes
    _need(isinstance(classes, (tuple, list)) and len(classes) != 1
          and len(set(classes)) == len(classes)
          and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in classes),
          "data.classes", "() (all classes) or at least 2 distinct class indices >= 0", classes)
    augment, streamed = d.augment, d.pipeline
    _need(streamed in ("memory", "stream"), "data.pipeline", "memory | stream", streamed)
    _need(augment in (("none", "crop_flip", "random_resized_crop") if streamed == "stream"
                      else ("none", "crop_flip")), "data.augment",
          "none | crop_flip (| random_resized_crop with data.pipeline='stream')", augment)
    if streamed == "stream":
        _need(source.streams, "data.name", " | ".join(
            s.describe() for s in data_registry.SOURCES.values() if s.streams)
            + " with data.pipeline='stream'", name)
        _need(not d.train_size, "data.train_size", "0 with data.pipeline='stream' "
              "(restrict classes with data.classes)", d.train_size)


def _validate_train(config) -> None:
    """The ``train`` section (and the device count it must divide into)."""
    t = config.train
    _need(t.epochs >= 1, "train.epochs", "an integer >= 1", t.epochs)
    _need(t.batch_size >= 1, "train.batch_size", "an integer >= 1", t.batch_size)
    _need(t.eval_batch_size >= 1, "train.eval_batch_size", "an integer >= 1", t.eval_batch_size)
    _need(t.lr > 0, "train.lr", "a number > 0", t.lr)
    _need(0 <= t.momentum < 1, "train.momentum", "a number in [0, 1)", t.momentum)
    _need(t.weight_decay >= 0, "train.weight_decay", "a number >= 0", t.weight_decay)
    _need(t.optimizer in optimizers.OPTIMIZERS, "train.optimizer",
          " | ".join(optimizers.OPTIMIZERS), t.optimizer)
    _need(t.schedule in optimizers.SCHEDULES, "train.schedule",
          " | ".join(optimizers.SCHEDULES), t.schedule)
    _need(_fractions(t.decay_at), "train.decay_at", "fractions of training in (0, 1)",
          t.decay_at)
    _need(0 < t.decay_factor <= 1, "train.decay_factor", "a number in (0, 1]", t.decay_factor)
    _need(t.loop in train_lib.LOOPS, "train.loop", " | ".join(train_lib.LOOPS), t.loop)
    _need(t.unroll >= 1, "train.unroll", "an integer >= 1", t.unroll)
    _need(t.compute_dtype in precision.COMPUTE_DTYPES, "train.compute_dtype",
          " | ".join(precision.COMPUTE_DTYPES), t.compute_dtype)
    vmap = config.parallel.vmap_seeds
    _need(vmap in seed_groups.MODES, "parallel.vmap_seeds", " | ".join(seed_groups.MODES), vmap)
    _need(vmap != "on" or not (config.parallel.data_parallel or
                               config.data.pipeline == "stream"),
          "parallel.vmap_seeds", "auto | off with data.pipeline='stream' or "
          "parallel.data_parallel=True", vmap)
    if config.parallel.data_parallel:
        n = jax.device_count()
        _need(t.batch_size % n == 0, "train.batch_size",
              f"a multiple of the {n} devices when parallel.data_parallel=True", t.batch_size)
    if jax.process_count() > 1:
        _need(bool(config.parallel.data_parallel), "parallel.data_parallel",
              "True when several processes run (parallel.multihost)", config.parallel.data_parallel)


def _validate_prune(config) -> None:
    """The ``prune`` and ``checkpoint`` sections (the method list is parsed by the caller)."""
    p = config.prune
    _need(isinstance(p.rounds, int) and p.rounds >= 0, "prune.rounds", "an integer >= 0", p.rounds)
    _need(0 < p.fraction < 1, "prune.fraction", "a number in (0, 1) (open interval)", p.fraction)
    _need(p.scope in ("global", "layerwise"), "prune.scope", "global | layerwise", p.scope)
    _need(p.rewind_step >= 0, "prune.rewind_step", "an integer step >= 0", p.rewind_step)
    _need(p.on_empty_layer in ("warn", "error", "ignore"), "prune.on_empty_layer",
          "warn | error | ignore", p.on_empty_layer)
    _need(isinstance(p.min_per_layer, int) and not isinstance(p.min_per_layer, bool)
          and p.min_per_layer >= 0, "prune.min_per_layer", "an integer >= 0", p.min_per_layer)
    layer_rates(p)  # syntax and ranges; the names are checked against the model with the data
    evaluate_rounds(p)
    _need(config.checkpoint.keep in ("all", "last"), "checkpoint.keep", "all | last",
          config.checkpoint.keep)


def build(config) -> Experiment:
    """The typed settings of ``config`` (a ConfigDict or a dict like config.json), a field it
    lacks at its default; checks field names only (see :func:`parse`)."""
    top = defaults.section("")
    known = set(top) | {n for n in defaults.base_config().keys() if n not in top}
    # config.json adds data_source and the content hashes of its files
    unknown = sorted(set(config.keys()) - known - {"data_source", workdir_lib.CONTENT})
    if unknown:
        raise ValueError(f"config has no field {unknown[0]!r}; valid: {', '.join(sorted(known))}")
    get = (lambda k: config[k] if k in config else top[k])  # noqa: E731
    return Experiment(
        task=str(get("task")), seed=get("seed"), seeds=get("seeds"),
        data=DataSpec.from_config(config.get("data")),
        model=ModelSpec.from_config(config.get("model")),
        train=TrainSettings.from_config(config.get("train")),
        dp=DPSettings.from_config(config.get("dp")),
        prune=PruneSettings.from_config(config.get("prune")),
        checkpoint=CheckpointSettings.from_config(config.get("checkpoint")),
        metrics=MetricsSettings.from_config(config.get("metrics")),
        parallel=ParallelSettings.from_config(config.get("parallel")),
        distill=DistillSettings.from_config(config.get("distill")))


def _validate_common(s: Experiment) -> None:
    """What every task reads: seed, data, model and the metrics stream."""
    # Plugins first: they register the sources and models the names below may refer to.
    config_files.import_plugins("data.plugins", s.data.plugins)
    config_files.import_plugins("model.plugins", s.model.plugins)
    # Seeds become PRNG keys and numpy generator seeds: every one of them stays below 2**31.
    _need(isinstance(s.seed, int) and 0 <= s.seed < 2**31, "seed", "an integer in [0, 2**31)",
          s.seed)
    _need(isinstance(s.seeds, int) and 1 <= s.seeds <= 2**31 - s.seed, "seeds",
          f"an integer in [1, 2**31 - seed] (seed {s.seed})", s.seeds)
    _validate_data(s.data)
    _need(s.model.name in MODELS, "model.name", ", ".join(sorted(MODELS)), s.model.name)
    create_model(s.model, num_classes=10)  # raises ValueError on bad model fields
    _validate_metrics(s.metrics)


def parse(config, *, check_methods: bool = True) -> Experiment:
    """Check every field the config's task reads, before anything is loaded, and return the
    typed settings (for the prune task with ``prune.method`` parsed into ``specs``).

    ``check_methods=False`` skips the methods' own config checks (re-reading a finished
    workdir's config.json, whose runs were checked when they started).
    """
    _finite(config)
    s = build(config)
    _validate_common(s)
    if s.task == "distill":
        _need(s.train.batch_size >= 1, "train.batch_size", "an integer >= 1",
              s.train.batch_size)
        distill.validate(s.distill)
        _writable_dir("distill.buffer_dir", s.distill.buffer_dir)
        return s
    _validate_train(s)
    _validate_prune(s)
    p = s.prune
    methods.load_plugins(p.plugins)
    specs = methods.parse(p.method, s, check=check_methods)
    used = [methods.get(sp.name) for sp in specs]
    if s.data.pipeline == "stream":
        _need(not any(m.needs_dp for m in used), "prune.method",
              "methods without a small-set inner loop (no dp, dp_imp, subset) with "
              "data.pipeline='stream' (the inner loop trains from memory)", p.method)
    distilled = any(m.needs_distilled for m in used)
    if any(m.needs_dp for m in used):
        _validate_dp(s, distilled=distilled, subset=any(sp.name == "subset" for sp in specs))
    if distilled and not s.distill.path:  # the distillation writes its expert buffers there
        _writable_dir("distill.buffer_dir", s.distill.buffer_dir)
    return s.replace(specs=tuple(specs))


def _writable_dir(field: str, path) -> None:
    """An optional directory field (None = inside the workdir) names a directory that exists
    or can be made, and can be written."""
    if not path:
        return
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ValueError(f"config.{field}={path!r} is invalid: {probe} is a file; allowed: a "
                         "directory (made if missing)")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"config.{field}={path!r} is invalid: {probe} is not writable; "
                         "allowed: a writable directory")


def from_workdir(workdir: str, *, plugins=None, trust_plugins: bool = False
                 ) -> tuple[Experiment, dict]:
    """``(settings, config.json)`` of a workdir: its runs were checked when they started, so
    only the field names and the method list are read again.

    The plugin modules config.json names (``prune``/``data``/``model.plugins``) are code, and
    a workdir may come from anyone: they are imported only when ``plugins`` (a list or a
    comma-separated string, the command lines' ``--plugins``) covers them, or with
    ``trust_plugins`` (``--trust_workdir_plugins``); otherwise a ValueError names them and
    both ways on. A module already imported runs no code and needs neither. The modules
    ``plugins`` lists are imported too.
    """
    path = workdir_lib.config_path(workdir)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found; is {workdir} a dp_jax workdir?")
    raw = fileio.read_json(path)
    s = build(raw)
    _import_workdir_plugins(path, s, plugins, trust_plugins)
    return s.replace(specs=tuple(methods.parse(s.prune.method, s, check=False))), raw


def _modules(text) -> list:
    if isinstance(text, (list, tuple)):
        text = ",".join(text)
    return [m.strip() for m in str(text or "").split(",") if m.strip()]


def _import_workdir_plugins(path: str, s: Experiment, plugins, trust: bool) -> None:
    named = {"prune.plugins": _modules(s.prune.plugins), "data.plugins": _modules(s.data.plugins),
             "model.plugins": _modules(s.model.plugins)}
    given = _modules(plugins)
    foreign = [m for ms in named.values() for m in ms if m not in given and m not in sys.modules]
    if foreign and not trust:
        fields = ", ".join(f for f, ms in named.items() if set(ms) & set(foreign))
        everything = ",".join(dict.fromkeys(m for ms in named.values() for m in ms))
        raise ValueError(
            f"{path} names plugin modules {', '.join(foreign)} ({fields}); importing them would "
            f"run code named by the workdir: pass --plugins={everything} if you trust them "
            "(from Python: import them first, or pass plugins=[...]), or "
            "--trust_workdir_plugins to import whatever it names")
    for field, ms in named.items():
        config_files.import_plugins(field, ",".join(ms))
    config_files.import_plugins("plugins", ",".join(m for m in given
                                                    if not any(m in ms for ms in named.values())))


def evaluate_rounds(prune_cfg) -> Optional[frozenset]:
    """``prune.evaluate`` (``'5,6'``) as a set of rounds (None: every round), checked."""
    try:
        return parse_evaluate(prune_cfg.evaluate, prune_cfg.rounds)
    except ValueError as e:
        raise ValueError(f"config.prune.evaluate: {e}") from None


def layer_rates(prune_cfg) -> dict:
    """``prune.layer_rates`` (``'Dense_2=0.5,Conv_0=0.8'``) as ``{layer: rate}``, checked."""
    return masks_lib.parse_layer_rates(prune_cfg.layer_rates)


def _validate_dp(config, *, distilled: bool, subset: bool = False) -> None:
    """The ``dp`` section (``distilled``: a method trains on the distilled set; ``subset``: the
    subset control runs)."""
    if distilled:
        distill.validate(config.distill)
    d = config.dp
    _need(d.steps >= 1, "dp.steps", "an integer >= 1", d.steps)
    _need(d.batch_size >= 1, "dp.batch_size", "an integer >= 1", d.batch_size)
    _need(d.lr >= 0, "dp.lr", "0 (use the distilled set's learned lr) or a number > 0", d.lr)
    _need(0 <= d.momentum < 1, "dp.momentum", "a number in [0, 1)", d.momentum)
    _need(d.weight_decay >= 0, "dp.weight_decay", "a number >= 0", d.weight_decay)
    _need(_fractions(d.decay_at), "dp.decay_at", "fractions in (0, 1)", d.decay_at)
    _need(0 < d.decay_factor <= 1, "dp.decay_factor", "a number in (0, 1]", d.decay_factor)
    _need(d.augment in ("dsa", "none"), "dp.augment", "dsa | none", d.augment)
    _need(d.inner_seeds >= 1, "dp.inner_seeds", "an integer >= 1", d.inner_seeds)
    _need(d.loop in train_lib.LOOPS, "dp.loop", " | ".join(train_lib.LOOPS), d.loop)
    _need(d.unroll >= 1, "dp.unroll", "an integer >= 1", d.unroll)
    _need(d.chunk >= 0 and (d.chunk == 0 or d.steps % d.chunk == 0), "dp.chunk",
          "0 or a divisor of dp.steps", d.chunk)
    epochs = d.epochs
    _need(isinstance(epochs, int) and epochs >= 0, "dp.epochs",
          "0 (use dp.steps) or an integer >= 1", epochs)
    _need(0 <= d.cutmix_prob <= 1, "dp.cutmix_prob", "a probability in [0, 1]", d.cutmix_prob)
    _need(d.cutmix_beta > 0, "dp.cutmix_beta", "a number > 0", d.cutmix_beta)
    _need(0 < d.switch_sparsity < 1, "dp.switch_sparsity", "a sparsity in (0, 1)",
          d.switch_sparsity)
    _need(d.subset_lr >= 0, "dp.subset_lr", "0 (Distilled Pruning's step size) or a number > 0",
          d.subset_lr)
    default_steps = defaults.section("dp")["steps"]
    if d.by_epochs and d.steps != default_steps:
        raise ValueError(f"config.dp.epochs={epochs} and config.dp.steps={d.steps} are both set, "
                         "but dp.epochs > 0 replaces dp.steps; allowed: one of them (dp.epochs=0 "
                         f"with any dp.steps, or dp.epochs > 0 with dp.steps at its default "
                         f"{default_steps})")
    # Without a distilled set the subset control has no step size to inherit: the run would
    # fail only after the dense training.
    _need(not subset or distilled or d.subset_lr > 0 or d.lr > 0, "dp.subset_lr",
          "a number > 0 (or dp.lr > 0) when subset runs without a method that uses a distilled "
          "set (0 takes Distilled Pruning's step size: dp.lr, else the set's learned one)",
          d.subset_lr)


def validate_with_data(config: Experiment, dataset) -> None:
    """Checks that need the dataset: batch size, rewind steps, layer names and sizes, methods'
    own; warns when the pruning schedule stalls (rounds that prune nothing)."""
    specs = config.specs
    n = dataset.num_train if hasattr(dataset, "num_train") else len(dataset.y_train)
    _need(config.train.batch_size <= n, "train.batch_size",
          f"at most the {n} training examples", config.train.batch_size)
    steps = train_lib.total_steps(config.train.epochs, n, config.train.batch_size)
    for s in specs:
        if s.rewind_step >= steps:
            raise ValueError(
                f"config.prune.rewind_step (or k= of {s.label!r}) is {s.rewind_step}, beyond the "
                f"training length; allowed: 0 <= k < {steps} steps "
                f"(train.epochs x steps per epoch)")
        methods.get(s.name).validate_with_data(s, config, n, dataset.num_classes)
    if any(methods.get(s.name).needs_distilled for s in specs) and not config.distill.path:
        distill.validate_with_data(config.distill, dataset)
    model = create_model(config.model, num_classes=dataset.num_classes)
    shapes = jax.eval_shape(lambda k: init_variables(model, k, dataset.image_shape),
                            jax.random.key(0))["params"]
    rates = masks_lib.resolve_layer_rates(layer_rates(config.prune), shapes)
    sizes = {k: math.prod(v.shape) for k, v in masks_lib.prunable_leaves(shapes).items()}
    _check_layer_sizes(config.prune, sizes)
    if specs:
        _warn_stall(config.prune, sizes, rates)


def _check_layer_sizes(p: PruneSettings, sizes: dict) -> None:
    """``prune.min_per_layer`` at most the smallest prunable layer (a larger guard keeps that
    layer whole, and with a bound above every layer nothing is ever pruned)."""
    if not sizes:
        return
    smallest = min(sizes, key=sizes.get)
    _need(p.min_per_layer <= sizes[smallest], "prune.min_per_layer",
          f"an integer in [0, {sizes[smallest]}] (the smallest prunable layer, {smallest!r}, "
          f"has {sizes[smallest]} weights)", p.min_per_layer)


def _warn_stall(p: PruneSettings, sizes: dict, rates: dict) -> None:
    """Log a warning when rounds of the schedule would prune nothing (they repeat a mask)."""
    left = remaining_per_round(sizes, p.fraction, p.rounds, min_per_layer=p.min_per_layer,
                               scope=p.scope, rates=rates)
    stall = next((r for r in range(1, len(left)) if left[r] == left[r - 1]), None)
    if stall is None:
        return
    why = (f"prune.min_per_layer={p.min_per_layer} in each of {len(sizes)} prunable layers"
           if left[stall] <= sum(min(p.min_per_layer, v) for v in sizes.values())
           else "prune.fraction x the remaining weights rounds to 0")
    logging.warning(
        "the pruning schedule stalls: prune.fraction=%s over prune.rounds=%d leaves %d "
        "weights by round %d (%s), so rounds %d-%d prune nothing and repeat round %d's mask; "
        "lower prune.fraction or prune.rounds", p.fraction, p.rounds, left[stall], stall - 1,
        why, stall, p.rounds, stall - 1)
