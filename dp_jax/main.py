r"""Command-line entry point of an experiment (``dp-jax run``; dp_jax/cli.py has the others).

  python -m dp_jax.main --config=configs/fashion_mnist.py --workdir=runs/fmnist \
      [--config.prune.rounds=10 --config.seed=1 ...]

``--config`` also takes the bare name of a packaged config (``--config=fashion_mnist:smoke``).
Flags are read here only; everything else takes the config.
"""

from absl import app, flags, logging
from ml_collections import config_flags

import importlib
import os
import sys

from dp_jax import cli

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


# config.task -> "module:function" taking (config, workdir); imported on demand.
TASKS = {"prune": "dp_jax.experiment:run", "distill": "dp_jax.distill:run"}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # orbax logs every file it renames at INFO; progress is shown by the round bar instead.
    logging.set_verbosity(logging.WARNING)
    from dp_jax import compile_cache
    compile_cache.enable()  # before anything compiles (dp_jax/compile_cache.py)
    from dp_jax import compile_time
    compile_time.seconds()  # start counting before the first compilation
    config = _CONFIG.value
    task = config.get("task", "prune")
    if task not in TASKS:
        raise app.UsageError(f"config.task={task!r} is invalid; allowed: {', '.join(TASKS)}")
    module, fn = TASKS[task].split(":")
    try:
        summary = getattr(importlib.import_module(module), fn)(
            config, _WORKDIR.value, restart_changed=_RESTART.value)
    except USER_ERRORS as e:
        if _VERBOSE.value:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if summary.get("methods"):
        # Sample std over seeds from the records (the report's convention), not summary.json's.
        from dp_jax import io, report
        from dp_jax import workdir as workdir_lib
        rows = io.read_jsonl(workdir_lib.rounds_path(_WORKDIR.value))
        for label, f in report.final_figures(rows).items():
            print(f"{label:>16}: sparsity {f['sparsity']:.3f}  test accuracy "
                  f"{report.mean_std(f['acc_mean'], f['acc_std'], f['n'], digits=4)}")
    print(f"report: {_WORKDIR.value}/report.md")


def run():
    """``dp-jax run`` and ``python -m dp_jax.main``.

    A leading subcommand is honoured too, so that the ``dp-jax`` script of an install made
    before dp_jax.cli existed (it calls this function) still dispatches.
    """
    from dp_jax import hugepages
    hugepages.reexec()  # before anything allocates (dp_jax/hugepages.py)
    if len(sys.argv) > 1 and sys.argv[1] == "run":
        sys.argv = sys.argv[:1] + sys.argv[2:]
    elif len(sys.argv) > 1 and sys.argv[1] in cli.COMMANDS:
        # This module's flags are defined already and would clash: hand over to a fresh process.
        os.execv(sys.executable, [sys.executable, "-m", "dp_jax.cli", *sys.argv[1:]])
    try:
        sys.argv = cli.resolve_config_argv(sys.argv)
        cli.check_override_keys(sys.argv)
    except (FileNotFoundError, ValueError) as e:
        cli.fail(e)
    app.run(main)


if __name__ == "__main__":
    run()
