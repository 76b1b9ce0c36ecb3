r"""Command-line entry point.

  python -m dp_jax.main --config=configs/fashion_mnist.py --workdir=runs/fmnist \
      [--config.prune.rounds=10 --config.seed=1 ...]

Flags are read here only; everything else takes the config.
"""

from absl import app, flags, logging
from ml_collections import config_flags

import importlib
import sys

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for all outputs; reused to resume.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show the full traceback of an error.")
flags.mark_flags_as_required(["config", "workdir"])

# What a user's input causes (bad values, missing files, a busy workdir, diverged training):
# one line and exit status 2; --verbose shows the traceback.
USER_ERRORS = (ValueError, FileNotFoundError, RuntimeError)


# config.task -> "module:function" taking (config, workdir); imported on demand.
TASKS = {"prune": "dp_jax.experiment:run", "distill": "dp_jax.distill:run"}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # orbax logs every file it renames at INFO; progress is shown by the round bar instead.
    logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value
    task = config.get("task", "prune")
    if task not in TASKS:
        raise app.UsageError(f"config.task={task!r} is invalid; allowed: {', '.join(TASKS)}")
    module, fn = TASKS[task].split(":")
    try:
        summary = getattr(importlib.import_module(module), fn)(config, _WORKDIR.value)
    except USER_ERRORS as e:
        if _VERBOSE.value:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for label, m in summary.get("methods", {}).items():
        print(f"{label:>16}: sparsity {m['final_sparsity']:.3f}  "
              f"test accuracy {m['final_test_accuracy_mean']:.4f} ± {m['final_test_accuracy_std']:.4f}")
    print(f"report: {_WORKDIR.value}/report.md")


def run():
    """Console-script entry (``dp-jax``)."""
    app.run(main)


if __name__ == "__main__":
    run()
