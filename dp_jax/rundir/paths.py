"""The run-directory contract: the only module that formats or parses its paths.

  config.json, metrics.jsonl, rounds.jsonl, summary.json, report.md, plots/*.png
  distilled.npz, checkpoints/distill/      (distillation, when made in the workdir)
  runs/<label>-seed<s>/                     one (method, seed) run; ``dense`` is the shared
      masks/round_XXX.npz                   dense training of a seed
      checkpoints/                          orbax round checkpoints
      rounds.jsonl                          the run's own records
  analysis/<kind>_<label>-seed<s>-roundXXX*  per-mask analysis results, plus summaries
  tb/                                       TensorBoard event files (metrics.tensorboard)
"""

from __future__ import annotations

import os
import re

from dp_jax.config import defaults
from dp_jax.storage import fileio, integrity

CONFIG, METRICS, ROUNDS, SUMMARY, REPORT = (
    "config.json", "metrics.jsonl", "rounds.jsonl", "summary.json", "report.md")
DENSE = "dense"  # label of a seed's shared dense training
_RUN = re.compile(r"^(?P<label>.+)-seed(?P<seed>\d+)$")
_MASK = re.compile(r"^round_(?P<round>\d{3,})\.npz$")


def config_path(workdir: str) -> str:
    """The resolved config of the run."""
    return os.path.join(workdir, CONFIG)


def metrics_path(workdir: str) -> str:
    """Per-epoch training and distillation metrics (JSON lines)."""
    return os.path.join(workdir, METRICS)


def rounds_path(workdir: str) -> str:
    """One record per evaluated mask, every run merged (JSON lines)."""
    return os.path.join(workdir, ROUNDS)


def summary_path(workdir: str) -> str:
    """Final figures per method and compute per phase."""
    return os.path.join(workdir, SUMMARY)


def report_path(workdir: str) -> str:
    """The human-readable report."""
    return os.path.join(workdir, REPORT)


def plot_path(workdir: str, name: str) -> str:
    """``plots/<name>`` (name includes the extension)."""
    return os.path.join(workdir, "plots", name)


def tensorboard_dir(workdir: str) -> str:
    """TensorBoard event files, one TensorBoard run per training round / expert / distillation."""
    return os.path.join(workdir, "tb")


def eval_mask_path(workdir: str) -> str:
    """Result of ``dp-jax eval-mask``."""
    return os.path.join(workdir, "eval_mask.json")


def distilled_path(workdir: str) -> str:
    """The distilled set made in this workdir."""
    return os.path.join(workdir, "distilled.npz")


def distilled_grid_path(workdir: str) -> str:
    """Picture of the distilled set."""
    return os.path.join(workdir, "distilled.png")


def experts_dir(workdir: str) -> str:
    """Default expert-trajectory buffer of the distillation."""
    return os.path.join(workdir, "experts")


def distill_checkpoints(workdir: str) -> str:
    """Checkpoints of the distillation loop."""
    return os.path.join(workdir, "checkpoints", "distill")


def analysis_dir(workdir: str) -> str:
    """Where analysis results go."""
    return os.path.join(workdir, "analysis")


def analysis_path(workdir: str, name: str) -> str:
    """``analysis/<name>``."""
    return os.path.join(analysis_dir(workdir), name)


def analysis_stem(label: str, seed: int, rnd: int) -> str:
    """File stem of one mask's analysis results, e.g. ``imp_k0-seed0-round002``."""
    return f"{run_name(label, seed)}-round{rnd:03d}"


_ANALYSIS_FILE = re.compile(r"^(?P<kind>[a-z]+)_(?P<label>.+)-seed(?P<seed>\d+)-round(?P<round>\d{3,})")


def analysis_file(kind: str, label: str, seed: int, rnd: int, suffix: str = ".json") -> str:
    """Name of one mask's analysis output, e.g. ``hessian_imp_k0-seed0-round002.json``."""
    return f"{kind}_{analysis_stem(label, seed, rnd)}{suffix}"


def parse_analysis_file(name: str):
    """``(kind, label, seed, round)`` of a per-mask analysis file name, or None (a summary)."""
    m = _ANALYSIS_FILE.match(name)
    return (m["kind"], m["label"], int(m["seed"]), int(m["round"])) if m else None


def run_name(label: str, seed: int) -> str:
    """Directory name of a (method label, seed) run."""
    return f"{label}-seed{int(seed)}"


def parse_run_name(name: str):
    """``(label, seed)`` of a run directory name, or None when it is not one."""
    m = _RUN.match(name)
    return (m["label"], int(m["seed"])) if m else None


def runs_dir(workdir: str) -> str:
    """The directory holding every run."""
    return os.path.join(workdir, "runs")


def run_dir(workdir: str, label: str, seed: int) -> str:
    """``runs/<label>-seed<s>``."""
    return os.path.join(runs_dir(workdir), run_name(label, seed))


def checkpoints_dir(workdir: str, label: str, seed: int) -> str:
    """Orbax round checkpoints of a run (``label=DENSE`` for the dense training)."""
    return os.path.join(run_dir(workdir, label, seed), "checkpoints")


def run_rounds_path(workdir: str, label: str, seed: int) -> str:
    """A run's own rounds.jsonl."""
    return os.path.join(run_dir(workdir, label, seed), ROUNDS)


def mask_path(workdir: str, label: str, seed: int, rnd: int) -> str:
    """The mask of round ``rnd`` of a run."""
    return os.path.join(run_dir(workdir, label, seed), "masks", f"round_{int(rnd):03d}.npz")


def list_runs(workdir: str) -> list[tuple[str, int]]:
    """Sorted ``(label, seed)`` of every run directory (the dense trainings included)."""
    d = runs_dir(workdir)
    names = sorted(os.listdir(d)) if os.path.isdir(d) else []
    return [p for p in map(parse_run_name, names) if p is not None]


def list_masks(workdir: str, label: str, seed: int) -> dict[int, str]:
    """``{round: path}`` of the mask files a run has written."""
    d = os.path.join(run_dir(workdir, label, seed), "masks")
    out = {}
    for f in sorted(os.listdir(d)) if os.path.isdir(d) else []:
        m = _MASK.match(f)
        if m:
            out[int(m["round"])] = os.path.join(d, f)
    return out


# ---- identity: a resumed workdir must have been made by the same settings -------------------

# Fields that only add work (more seeds, rounds, methods, rewind steps) or cannot change any
# result (loop forms proven step-identical, evaluation batch size, sharding, checkpoint cadence).
# prune.evaluate chooses which rounds are trained and tested, never what a trained round gives.
ADDITIVE = ("seeds", "prune.method", "prune.rounds", "prune.rewind_step", "prune.plugins",
            "data.plugins", "model.plugins", "prune.evaluate")
NO_EFFECT = ("task", "data_source", "metrics.", "parallel.", "checkpoint.", "train.eval_batch_size", "train.loop", "train.unroll",
             "dp.loop", "dp.unroll", "dp.chunk", "distill.checkpoint_every", "data.label_cache")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


# config.json's record of the content of the files the config names by path, nested like the
# fields naming them: ``{"data": {"name": sha256}, "distill": {"path": sha256}}``. As identity
# fields they read ``data.name.sha256`` and ``distill.path.sha256``, beside the field they
# belong to (so a changed distilled set touches only the runs that read ``distill.*``).
CONTENT = "content_sha256"
CONTENT_SUFFIX = ".sha256"


def identity_fields(config: dict) -> dict:
    """The flattened fields of a config dict that decide its results (the recorded content
    hashes of its files included)."""
    def kept(key):
        return not any(key == f or (f.endswith(".") and key.startswith(f))
                       for f in ADDITIVE + NO_EFFECT)
    fields = {k: v for k, v in _flatten({k: v for k, v in config.items() if k != CONTENT}).items()
              if kept(k)}
    fields.update({f"{k}{CONTENT_SUFFIX}": v
                   for k, v in _flatten(config.get(CONTENT) or {}).items()})
    return fields


def _fill_added(old: dict, new: dict) -> None:
    """Give ``old`` (a workdir's or run's recorded fields) the fields added to the project
    since it was written: a setting takes its default (by construction the behaviour the
    workdir was made with); a content hash, never recorded then, cannot be compared and takes
    this run's value (the workdir records it from now on)."""
    added = set(new) - set(old)
    defaults_now = base_defaults() if added else {}
    for k in added:
        if k in defaults_now:
            old[k] = defaults_now[k]
        elif k.endswith(CONTENT_SUFFIX):
            old[k] = new[k]


def identity_diff(workdir: str, config: dict) -> dict:
    """``{field: (workdir's value, this run's value)}`` of the result-deciding fields that differ
    from the workdir's config.json (empty for a new workdir)."""
    path = config_path(workdir)
    if not os.path.exists(path):
        return {}
    raw = fileio.read_json(path)
    old, new = identity_fields(raw), identity_fields(config)
    unset = "<unset>"
    _fill_added(old, new)  # fields added to the project after the workdir was made
    diff = {k: (old.get(k, unset), new.get(k, unset)) for k in sorted(set(old) | set(new))
            if old.get(k, unset) != new.get(k, unset)}
    data = raw.get("data", {})
    if CONTENT not in raw and data.get("classes") and data.get("pipeline") != "stream":
        # Made before data.classes applied to in-memory data: its runs saw every class.
        diff["data.classes (in memory)"] = ("ignored (every class)", "applied")
    return diff


def base_defaults() -> dict:
    """The result-deciding fields of the base config (dp_jax/config/defaults.py) at defaults."""
    return identity_fields(defaults.base_config().to_dict())


def check_identity(workdir: str, config: dict, *, restart: bool = False) -> dict:
    """Refuse to resume ``workdir`` with settings that would change its finished results.

    Raises ValueError listing every differing field (old and new values) and the ways forward,
    unless ``restart`` (``--restart_changed``): then the differences are returned, for the
    caller to move the affected results aside (:func:`supersede`) and run them afresh. A
    workdir that holds no result yet (:func:`holds_results`: a run that failed or was killed
    before its first checkpoint) is not bound by its config.json: the differences are
    returned as with ``restart``, and moving its leftovers aside costs nothing.
    """
    diff = identity_diff(workdir, config)
    if diff and not restart and holds_results(workdir):
        lines = [f"  {k}: {a!r} -> {b!r}" for k, (a, b) in diff.items()]
        raise ValueError(
            f"{workdir} holds results of other settings; resuming would mix them. Differing "
            "fields (workdir -> this run):\n" + "\n".join(lines) + "\nUse a new --workdir, "
            "or add --restart_changed to run the affected runs afresh in place (their old "
            f"files move to {os.path.join(workdir, SUPERSEDED)}/). (More seeds, rounds, methods "
            "or rewind steps extend a workdir and need neither.)")
    return diff


def holds_results(workdir: str) -> bool:
    """Whether ``workdir`` holds anything a run computed: a round (checkpoint, mask, record),
    a distilled set or its experts and checkpoints, an analysis. Before that, its config.json
    and the runs' identity.json files guard nothing."""
    if any(os.path.exists(p) for p in (rounds_path(workdir), summary_path(workdir),
                                       distilled_path(workdir))):
        return True
    for top in (runs_dir(workdir), experts_dir(workdir), os.path.join(workdir, "checkpoints"),
                analysis_dir(workdir)):
        for _, _, files in os.walk(top):
            if any(f != "identity.json" for f in files):
                return True
    return False


# ---- per-run identity and restarting changed runs in place -----------------------------------

SMALL_SET = ("dp.", "distill.")    # read only by methods that train on a small set
DISTILL_INPUTS = ("distill.", "data.", "model.", "seed")  # what a distilled set depends on
SUPERSEDED = "superseded"


def run_fields(config: dict, label: str, seed: int, *, small_set: bool) -> dict:
    """The fields that decide one (method, seed) run's results (``dp``/``distill`` only for
    methods that read them)."""
    fields = {k: v for k, v in identity_fields(config).items()
              if small_set or not k.startswith(SMALL_SET)}
    fields.pop("seed", None)
    return dict(fields, run=label, seed=int(seed))


def identity_path(workdir: str, label: str, seed: int) -> str:
    """The fields that made one (method, seed) run: ``runs/<run>/identity.json``."""
    return os.path.join(run_dir(workdir, label, seed), "identity.json")


# identity.json's marker of a run whose every file is recorded in its checksums.json (made, or
# adopted, by a version that records them all): there a missing manifest is damage.
CHECKSUMS = "checksums"


def check_run_identity(workdir: str, label: str, seed: int, fields: dict) -> None:
    """Record a run's fields in ``runs/<run>/identity.json`` (with the :data:`CHECKSUMS`
    marker), or refuse a run directory that an earlier identity file says was made by other
    settings."""
    path = identity_path(workdir, label, seed)
    if os.path.exists(path):
        old = fileio.read_json(path)
        old.pop(CHECKSUMS, None)  # who made the run, not a setting
        _fill_added(old, fields)  # as for config.json: fields added after the run was made
        diff = [f"{k}: {old.get(k)!r} -> {fields.get(k)!r}" for k in sorted(set(old) | set(fields))
                if old.get(k) != fields.get(k)]
        if diff:
            raise ValueError(f"{run_dir(workdir, label, seed)} was made by other settings ("
                             + "; ".join(diff) + "); use a new --workdir or --restart_changed")
        return
    fileio.write_json(path, dict(fields, **{CHECKSUMS: 1}))


def supersede(workdir: str, runs, *, distill: bool) -> str:
    """Move the results of ``runs`` (``(label, seed)`` pairs), their analysis files and, with
    ``distill``, the workdir's distilled set, distillation checkpoints and expert buffer into
    ``superseded/<UTC time>/`` (nothing is deleted); returns that directory.

    metrics.jsonl keeps the rows of the runs that stay (the full old file moves too).
    """
    import shutil
    import time
    dest = os.path.join(workdir, SUPERSEDED, time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
    os.makedirs(dest, exist_ok=True)
    moved = [d for label, seed in runs for d in (
        run_dir(workdir, label, seed),
        os.path.join(tensorboard_dir(workdir), run_name(label, seed)))]
    gone = {(label, int(seed)) for label, seed in runs}
    adir = analysis_dir(workdir)

    def stale(name):  # per-mask results of a moved run, or a summary (it would mix old and new)
        parsed = parse_analysis_file(name)
        return parsed is None or (parsed[1], parsed[2]) in gone
    old_analysis = [f for f in (sorted(os.listdir(adir)) if os.path.isdir(adir) else [])
                    if stale(f) and f != integrity.MANIFEST]
    for f in old_analysis:
        integrity.forget(adir, f)
    moved += [os.path.join(adir, f) for f in old_analysis]
    if distill:
        moved += [distilled_path(workdir), distilled_grid_path(workdir),
                  distill_checkpoints(workdir), experts_dir(workdir),
                  os.path.join(tensorboard_dir(workdir), "distill"),
                  os.path.join(tensorboard_dir(workdir), "experts")]
        integrity.forget(workdir, os.path.basename(distilled_path(workdir)))
    for path in moved + [config_path(workdir), metrics_path(workdir)]:
        if os.path.exists(path):
            target = os.path.join(dest, os.path.relpath(path, workdir))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            (shutil.copy2 if path in (config_path(workdir), metrics_path(workdir))
             else shutil.move)(path, target)
    gone = {run_name(label, seed) for label, seed in runs}
    if os.path.exists(metrics_path(workdir)):
        rows = fileio.read_jsonl(metrics_path(workdir))
        fileio.write_jsonl(metrics_path(workdir), [
            r for r in rows if run_name(str(r.get("run")), int(r.get("seed") or 0)) not in gone
            and not (distill and r.get("phase") in ("experts", "distill", "distill_eval"))])
    return dest


def check_writable(workdir: str) -> None:
    """A clear error when ``workdir`` is a file or cannot be written."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ValueError(f"--workdir={workdir} is a file, not a directory")
    probe = workdir
    while not os.path.exists(probe):
        probe = os.path.dirname(os.path.abspath(probe))
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"--workdir={workdir}: {probe} is not writable")


# ---- locking: one process per workdir -------------------------------------------------------


def lock_path(workdir: str) -> str:
    """The lock file of a workdir."""
    return os.path.join(workdir, ".lock")
