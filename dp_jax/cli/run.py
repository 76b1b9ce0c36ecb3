r"""Command-line entry point of an experiment (``dp-jax run``; dp_jax/cli/main.py has the others).

  python -m dp_jax.main --config=configs/fashion_mnist.py --workdir=runs/fmnist \
      [--config.prune.rounds=10 --config.seed=1 ...]

``--config`` also takes the bare name of a packaged config (``--config=fashion_mnist:smoke``).
Flags are read here only; everything else takes the config.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from dp_jax.cli import common as cli
from dp_jax.system import compile_cache, compile_time, hugepages

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for all outputs; reused to resume.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show the full traceback of an error.")
_RESTART = flags.DEFINE_bool(
    "restart_changed", False, "When the workdir was made with other settings, move the runs "
    "those settings affect to <workdir>/superseded/ and run them afresh in place.")
flags.mark_flags_as_required(["config", "workdir"])

# What a user's input causes (bad values, missing files, a busy workdir, diverged training):
# one line and exit status 2; --verbose shows the traceback.
USER_ERRORS = cli.USER_ERRORS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # orbax logs every file it renames at INFO; progress is shown by the round bar instead.
    logging.set_verbosity(logging.WARNING)
    compile_cache.enable()  # before anything compiles (dp_jax/system/compile_cache.py)
    compile_time.seconds()  # start counting before the first compilation
    # Imported here, after the huge-pages re-exec of run(): the tasks import JAX and the
    # whole library, which the first (replaced) process would load in vain.
    from dp_jax.reports import pruning as report
    from dp_jax.tasks import api, registry
    config = _CONFIG.value
    try:
        registry.get(config.get("task", "prune"))
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    try:
        results = api.run(config, _WORKDIR.value, restart_changed=_RESTART.value)
    except USER_ERRORS as e:
        if _VERBOSE.value:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    # Sample std over seeds from the records (the report's convention), not summary.json's.
    for label, f in report.final_figures(results.records).items():
        print(f"{label:>16}: sparsity {f['sparsity']:.3f}  test accuracy "
              f"{report.mean_std(f['acc_mean'], f['acc_std'], f['n'], digits=4)}")
    print(f"report: {_WORKDIR.value}/report.md")


def run():
    """``dp-jax run`` and ``python -m dp_jax.main``."""
    hugepages.reexec()  # before anything allocates (dp_jax/system/hugepages.py)
    sys.argv = cli.resolved_argv()
    cli.run_app(main)


if __name__ == "__main__":
    run()
