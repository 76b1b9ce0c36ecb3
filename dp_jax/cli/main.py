r"""The ``dp-jax`` console script: one command, five subcommands.

  dp-jax run       --config=C --workdir=W [--config.x=v ...]   (= python -m dp_jax.main)
  dp-jax analyze   --workdir=W [...]                            (= python -m dp_jax.analysis)
  dp-jax report    DIR [DIR ...] [--out=DIR]                    (= python -m dp_jax.report)
  dp-jax eval-mask --config=C --mask=M.npz --workdir=W [--seed=S] [--start=init|reinit]
  dp-jax export    --workdir=W --run=LABEL --seed=S --round=R --out=T.npz [--source=...]

``python -m dp_jax.cli <cmd> ...`` is the same. ``--config`` takes a path (``path:variant``)
or the bare name of a config shipped with the package (``--config=fashion_mnist:smoke``).
Every subcommand prints a user error as one line (``error: ...``) and exits with status 2;
``--verbose`` shows the traceback. Flags are defined and read here (and in the modules that
``run`` and ``analyze`` delegate to) only; the work is done by library functions taking
typed arguments (``dp_jax.tasks.eval_mask``, ``dp_jax.tasks.export``, ``dp_jax.reports.pruning``).
"""

from __future__ import annotations

import os
import sys

from dp_jax.cli.common import (OneLineParser, check_output, define_plugin_flags, fail, guarded,
                              resolved_argv, run_app)
from dp_jax.config.files import packaged_configs
from dp_jax.system import hugepages

PROG = "dp-jax"
# Seeds become PRNG keys and numpy generator seeds (tasks/settings.py: below 2**31).
SEED_BOUNDS = dict(lower_bound=0, upper_bound=2**31 - 1)


# ---- subcommands ---------------------------------------------------------------------------

def cmd_run() -> None:
    """``dp-jax run``: the experiment (python -m dp_jax.main)."""
    from dp_jax.cli import run as main_lib  # entry set-up: a subcommand's module (its flags, JAX) loads only when chosen
    main_lib.run()


def cmd_analyze() -> None:
    """``dp-jax analyze``: analyses of a finished workdir (python -m dp_jax.analysis)."""
    from dp_jax.cli import analyze as analysis_main  # entry set-up: a subcommand's module (its flags, JAX) loads only when chosen
    analysis_main.run()


def cmd_report(argv: list[str] | None = None) -> None:
    """``dp-jax report DIR [DIR ...] [--out=DIR]`` (also ``python -m dp_jax.report``)."""
    parser = OneLineParser(prog=f"{PROG} report", description="Rewrite report.md and plots "
                            "of a workdir, or merge the seeds of several into --out.")
    parser.add_argument("workdirs", nargs="+", metavar="DIR")
    parser.add_argument("--out", default=None,
                        help="where the merged report goes (required with several DIRs)")
    parser.add_argument("--verbose", action="store_true", help="traceback on errors")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if len(args.workdirs) > 1 and not args.out:
        fail(f"{len(args.workdirs)} workdirs need --out=DIR for the merged report")
    try:  # before the report's work: where it goes must be writable
        check_output("out" if args.out else "workdir", args.out or args.workdirs[0])
    except ValueError as e:
        fail(e)
    from dp_jax.reports import pruning as report  # entry set-up: a subcommand's module (its flags, JAX) loads only when chosen

    from dp_jax.rundir import lock as lock_lib  # entry set-up: loads orbax, as the report does

    def go(_):
        if len(args.workdirs) == 1 and args.out in (None, args.workdirs[0]):
            with lock_lib.writing_into(args.workdirs[0], args.workdirs[0]):
                return report.write_report(args.workdirs[0])
        with lock_lib.writing_into(args.out, args.out):
            return report.write_report(args.out, sources=args.workdirs)
    print(guarded(go, lambda: args.verbose)(None))


def cmd_eval_mask() -> None:
    """``dp-jax eval-mask``: train and test a mask file under a config's recipe."""
    from absl import app, flags, logging
    from ml_collections import config_flags
    config = config_flags.DEFINE_config_file("config", None, "Experiment config (path or name).",
                                             lock_config=True)
    mask = flags.DEFINE_string("mask", None, "Mask file (npz of bool arrays by parameter path).")
    workdir = flags.DEFINE_string("workdir", None, "Where eval_mask.json is written.")
    seed = flags.DEFINE_integer("seed", None, "Seed of the init and data order (default: "
                                "config.seed).", **SEED_BOUNDS)
    start = flags.DEFINE_enum("start", "init", ["init", "reinit"],
                              "Weights to train: the seed's init, or its re-init key.")
    verbose = flags.DEFINE_bool("verbose", False, "Show the full traceback of an error.")
    flags.mark_flags_as_required(["config", "mask", "workdir"])

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        check_output("workdir", workdir.value)  # before the training, not after it
        if not os.path.isfile(mask.value):
            raise FileNotFoundError(f"--mask={mask.value}: no such file")
        logging.set_verbosity(logging.WARNING)
        from dp_jax.tasks import eval_mask  # entry set-up: a subcommand's module (its flags, JAX) loads only when chosen
        res = eval_mask.evaluate_mask(config.value, mask.value, workdir.value,
                                      seed=seed.value, start=start.value)
        print(f"{res['mask']}: sparsity {res['sparsity']:.4f}  test accuracy "
              f"{res['test_accuracy']:.4f}  test loss {res['test_loss']:.4f}")
        print(f"written: {eval_mask.result_path(workdir.value)}")
    sys.argv = resolved_argv()
    run_app(guarded(main, lambda: verbose.value))


def cmd_export() -> None:
    """``dp-jax export``: one self-describing ticket file of a run's round."""
    from absl import app, flags, logging
    from dp_jax.tasks import export  # entry set-up: a subcommand's module (its flags, JAX) loads only when chosen
    workdir = flags.DEFINE_string("workdir", None, "A dp_jax workdir.")
    run = flags.DEFINE_string("run", None, "Run label, e.g. imp_k0.")
    seed = flags.DEFINE_integer("seed", None, "Seed of the run.", **SEED_BOUNDS)
    rnd = flags.DEFINE_integer("round", None, "Round to export.", lower_bound=0)
    out = flags.DEFINE_string("out", None, "Ticket file to write (.npz).")
    source = flags.DEFINE_enum("source", "auto", list(export.SOURCES),
                               "Trained weights: the round checkpoint when kept (auto), "
                               "checkpoint only, or retrain from the start point.")
    verbose = flags.DEFINE_bool("verbose", False, "Show the full traceback of an error.")
    plugins, trust = define_plugin_flags()
    flags.mark_flags_as_required(["workdir", "run", "seed", "round", "out"])

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        check_output("out", out.value, file=True)  # before the export's work, not after it
        logging.set_verbosity(logging.WARNING)  # orbax logs every file it reads at INFO
        meta = export.export_ticket(workdir.value, run.value, seed.value, rnd.value, out.value,
                                    source=source.value, plugins=plugins.value,
                                    trust_plugins=trust.value)
        check = meta.get("check") or {}
        acc = meta['record']['test_accuracy']  # None: the run did not train it (prune.evaluate)
        print(f"{out.value}: {meta['run']} seed {meta['seed']} round {meta['round']}, sparsity "
              f"{meta['sparsity']:.4f}, trained weights {meta['trained_source']}, "
              + ("not trained in the run" if acc is None else f"recorded test accuracy {acc:.4f}")
              + (f" (re-evaluated {check['test_accuracy']:.4f})" if check else ""))
    run_app(guarded(main, lambda: verbose.value))


def cmd_import_distilled() -> None:
    """``dp-jax import-distilled``: ``python -m dp_jax.distill.convert`` (published sets)."""
    from dp_jax.cli import distill_tools  # entry set-up: a subcommand's module (its flags, JAX) loads only when chosen
    sys.exit(distill_tools.convert_main(sys.argv[1:]))


COMMANDS = {"run": cmd_run, "analyze": cmd_analyze, "report": cmd_report,
            "eval-mask": cmd_eval_mask, "export": cmd_export,
            "import-distilled": cmd_import_distilled}


def usage() -> str:
    """The top-level help text."""
    return (f"usage: {PROG} <command> [flags]   ({PROG} <command> --help for its flags)\n"
            "commands:\n"
            "  run        run (or resume) an experiment: --config=C --workdir=W\n"
            "  analyze    instability/Hessian/landscape analyses of a workdir\n"
            "  report     rewrite a workdir's report, or merge workdirs' seeds (--out=DIR)\n"
            "  eval-mask  train and test a mask file under a config's recipe\n"
            "  export     write one round's mask, init and trained weights as a ticket file\n"
            "  import-distilled  convert a published distilled set (MTT/IDC .pt, npz) into a\n"
            "             validated distilled.npz: --format=mtt|idc|npz --out=OUT.npz ...\n"
            f"--config takes a path or a packaged config: {', '.join(packaged_configs())}")


def main() -> None:
    """Console-script entry: dispatch ``sys.argv[1]`` to its subcommand."""
    hugepages.reexec()  # before anything allocates (dp_jax/system/hugepages.py)
    args = sys.argv[1:]
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        sys.exit(0 if args else 2)
    if args[0].startswith("-"):  # `dp-jax --config=... --workdir=...`, as before subcommands
        args = ["run"] + args
    cmd = args[0]
    if cmd not in COMMANDS:
        fail(f"unknown command {cmd!r}; commands: {', '.join(COMMANDS)} (see {PROG} --help)")
    sys.argv = [f"{PROG} {cmd}"] + args[1:]
    COMMANDS[cmd]()


if __name__ == "__main__":
    main()
