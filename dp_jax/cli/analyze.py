r"""Command line: analyse the masks of a finished workdir.

  python -m dp_jax.analysis --workdir=runs/fmnist \
      [--analyses=instability,hessian,landscape] [--runs=imp_k0,random] [--rounds=0,2] [--seed=0]

Writes workdir/analysis/*.json, workdir/plots/*.png and the analysis section of
workdir/report.md. Flags are read here only; the work is dp_jax.tasks.analyze.run.
"""

import os
import sys
import time

from absl import app, flags, logging

from dp_jax.analysis import registry as analyses_lib
from dp_jax.analysis import settings as analysis_settings
from dp_jax.cli.common import check_output, define_plugin_flags, guarded, run_app
from dp_jax.reports import analysis as report_lib
from dp_jax.rundir import lock as lock_lib
from dp_jax.rundir import paths as workdir_lib
from dp_jax.system import compile_cache, hugepages
from dp_jax.tasks import analyze as run_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "A finished dp_jax workdir.")
_ANALYSES = flags.DEFINE_list("analyses", list(analyses_lib.ANALYSES),
                              "Any of: " + ", ".join(analyses_lib.ANALYSES))
_RUNS = flags.DEFINE_list("runs", None, "Run labels (e.g. imp_k0,random); default: all.")
_ROUNDS = flags.DEFINE_list("rounds", None, "Rounds to analyse; default: every saved round.")
_SEED = flags.DEFINE_integer("seed", None, "One seed; default: every seed of the workdir.",
                             lower_bound=0, upper_bound=2**31 - 1)
_COPIES = flags.DEFINE_integer("copies", 2, "Copies per start point (landscape uses >= 3).")
_BN = flags.DEFINE_enum("bn_mode", "both", list(analysis_settings.BN_CHOICES),
                        "BatchNorm statistics along paths (BatchNorm models only).")
_K = flags.DEFINE_list("k_values", None, "Rewind steps of the dense instability curve.")
_HESSIAN_EXAMPLES = flags.DEFINE_integer("hessian_examples", 2000,
                                         "Training examples for the Hessian.")
_HESSIAN_AT = flags.DEFINE_list("hessian_at", ["trained"], "trained and/or start.")
_LANCZOS = flags.DEFINE_integer("lanczos_steps", 20, "Lanczos steps.")
_GRID = flags.DEFINE_integer("landscape_grid", 11, "Landscape grid points per axis.")
_LAND_EXAMPLES = flags.DEFINE_integer("landscape_examples", 2000, "Test examples for landscapes.")
_LAYERWISE = flags.DEFINE_bool("layerwise", True, "Layer-wise interpolation.")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False,
                                 "Only redraw plots and the report section from analysis/*.json.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show the full traceback of an error.")
_PLUGINS, _TRUST = define_plugin_flags()
flags.mark_flag_as_required("workdir")


def _ints(name, values):
    try:
        return [int(v) for v in values]
    except ValueError:
        raise app.UsageError(f"--{name} must be a comma-separated list of integers, "
                             f"got {values}") from None


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # Before any work: the outputs can be written and the workdir is a finished one.
    check_output("workdir", _WORKDIR.value)
    if not os.path.isfile(workdir_lib.config_path(_WORKDIR.value)):
        raise FileNotFoundError(f"--workdir={_WORKDIR.value} has no config.json; allowed: a "
                                "dp_jax workdir (made by dp-jax run)")
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it touches at INFO
    compile_cache.enable()
    if _REPORT_ONLY.value:
        with lock_lib.Lock(_WORKDIR.value):  # report.md is the workdir's: one writer
            report_lib.write(_WORKDIR.value)
        print(f"rewrote the analysis section of {_WORKDIR.value}/report.md")
        return
    settings = run_lib.Settings(
        copies=_COPIES.value, bn_mode=_BN.value, layerwise=_LAYERWISE.value,
        k_values=tuple(_ints("k_values", _K.value)) if _K.value else None,
        hessian_examples=_HESSIAN_EXAMPLES.value, hessian_at=tuple(_HESSIAN_AT.value),
        lanczos_steps=_LANCZOS.value, landscape_grid=_GRID.value,
        landscape_examples=_LAND_EXAMPLES.value)
    t0 = time.time()

    def log(msg):
        print(f"[{time.time() - t0:7.1f} s] {msg}", file=sys.stderr, flush=True)

    out = run_lib.run(_WORKDIR.value, analyses=_ANALYSES.value, runs=_RUNS.value,
                      rounds=_ints("rounds", _ROUNDS.value) if _ROUNDS.value else None,
                      seed=_SEED.value, settings=settings, log=log, plugins=_PLUGINS.value,
                      trust_plugins=_TRUST.value)
    print(f"analysed {len(out['results'])} masks in {out['wall_s']:.0f} s; "
          f"see {_WORKDIR.value}/report.md and {_WORKDIR.value}/analysis/")


def run() -> None:
    """``python -m dp_jax.analysis``: re-exec with huge pages, then parse flags and analyse."""
    hugepages.reexec()  # before anything allocates (dp_jax/system/hugepages.py)
    run_app(guarded(main, lambda: _VERBOSE.value))


if __name__ == "__main__":
    run()
