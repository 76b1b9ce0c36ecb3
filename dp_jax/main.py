r"""Command-line entry point.

  python -m dp_jax.main --config=configs/fashion_mnist.py --workdir=runs/fmnist \
      [--config.prune.rounds=10 --config.seed=1 ...]

Flags are read here only; everything else takes the config.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from dp_jax import experiment

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for all outputs; reused to resume.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # orbax logs every file it renames at INFO; progress is shown by the round bar instead.
    logging.set_verbosity(logging.WARNING)
    summary = experiment.run(_CONFIG.value, _WORKDIR.value)
    for label, m in summary["methods"].items():
        print(f"{label:>16}: sparsity {m['final_sparsity']:.3f}  "
              f"test accuracy {m['final_test_accuracy_mean']:.4f} ± {m['final_test_accuracy_std']:.4f}")
    print(f"report: {_WORKDIR.value}/report.md")


def run():
    """Console-script entry (``dp-jax``)."""
    app.run(main)


if __name__ == "__main__":
    run()
