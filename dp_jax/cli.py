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
typed arguments (``dp_jax.eval_mask``, ``dp_jax.export``, ``dp_jax.report``).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from typing import Callable

PROG = "dp-jax"
# What a user's input causes (bad values, missing files, a busy workdir, diverged training).
USER_ERRORS = (ValueError, FileNotFoundError, RuntimeError)
PACKAGED_CONFIGS = "dp_jax_configs"  # configs/ as shipped in the wheel (pyproject.toml)


# ---- --config: a path or a packaged config's name ------------------------------------------

def configs_dir() -> str | None:
    """Directory of the packaged configs: the installed package, else a checkout's configs/."""
    try:
        spec = importlib.util.find_spec(PACKAGED_CONFIGS)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        return list(spec.submodule_search_locations)[0]
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    return here if os.path.isdir(here) else None


def packaged_configs() -> list[str]:
    """Names usable as ``--config=NAME`` (files of the packaged configs, helpers excluded)."""
    d = configs_dir()
    names = sorted(os.listdir(d)) if d else []
    return [n[:-3] for n in names if n.endswith(".py") and not n.startswith("_")]


def resolve_config(spec: str) -> str:
    """``path[:variant]`` unchanged when the path exists, else a packaged config's path.

    Raises FileNotFoundError naming the packaged configs when neither exists.
    """
    path, colon, variant = spec.partition(":")
    if os.path.exists(path):
        return spec
    name = path[:-3] if path.endswith(".py") else path
    if "/" in name or os.sep in name:
        raise FileNotFoundError(f"--config={spec}: no such file {path!r}")
    d = configs_dir()
    candidate = os.path.join(d, name + ".py") if d and not name.startswith("_") else ""
    if os.path.isfile(candidate):
        return candidate + colon + variant
    raise FileNotFoundError(f"--config={spec}: no such file, and no packaged config named "
                            f"{name!r}; packaged: {', '.join(packaged_configs()) or 'none'}")


def resolve_config_argv(argv: list[str]) -> list[str]:
    """``argv`` with the value of ``--config`` (``=v`` or `` v``) resolved by resolve_config."""
    out, i = list(argv), 1
    while i < len(out):
        a = out[i]
        if a.startswith("--config="):
            out[i] = "--config=" + resolve_config(a[len("--config="):])
        elif a == "--config" and i + 1 < len(out):
            out[i + 1] = resolve_config(out[i + 1])
            i += 1
        i += 1
    return out


def check_override_keys(argv: list[str]) -> None:
    """Every ``--config.a.b=v`` names a field of the config file (else a one-line ValueError).

    ml_collections would raise a bare AttributeError from inside flag parsing; this names the
    section and lists its valid keys instead.
    """
    spec = next((a[len("--config="):] for a in argv if a.startswith("--config=")), None)
    overrides = [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]
    if spec is None or not overrides:
        return
    from dp_jax import config_files
    config = config_files.load_config(spec)
    for dotted in overrides:
        node, parts = config, dotted.split(".")
        for i, part in enumerate(parts):
            keys = list(node.keys()) if hasattr(node, "keys") else []
            if part not in keys:
                where = ".".join(parts[:i]) or "the config"
                raise ValueError(f"--config.{dotted}: {where} has no field {part!r}; valid: "
                                 f"{', '.join(sorted(keys)) or 'none (not a section)'}")
            node = node[part]


# ---- user errors: one line, exit 2 -----------------------------------------------------------

def fail(e: BaseException) -> None:
    """Print ``error: <e>`` on stderr and exit with status 2."""
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def guarded(fn: Callable, verbose: Callable[[], bool]) -> Callable:
    """``fn(argv)`` with user errors printed as one line (exit 2) unless ``verbose()``."""
    def wrapper(argv):
        from dp_jax import compile_cache
        compile_cache.enable()  # before anything compiles
        try:
            return fn(argv)
        except USER_ERRORS as e:
            if verbose():
                raise
            fail(e)
    return wrapper


def _resolved_argv() -> list[str]:
    try:
        return resolve_config_argv(sys.argv)
    except FileNotFoundError as e:
        fail(e)


# ---- subcommands ---------------------------------------------------------------------------

def cmd_run() -> None:
    """``dp-jax run``: the experiment (python -m dp_jax.main)."""
    from dp_jax import main as main_lib
    main_lib.run()


def cmd_analyze() -> None:
    """``dp-jax analyze``: analyses of a finished workdir (python -m dp_jax.analysis)."""
    from absl import app, flags
    from dp_jax.analysis import __main__ as analysis_main  # defines the analysis flags
    verbose = flags.DEFINE_bool("verbose", False, "Show the full traceback of an error.")
    app.run(guarded(analysis_main.main, lambda: verbose.value))


def cmd_report(argv: list[str] | None = None) -> None:
    """``dp-jax report DIR [DIR ...] [--out=DIR]`` (also ``python -m dp_jax.report``)."""
    parser = _OneLineParser(prog=f"{PROG} report", description="Rewrite report.md and plots "
                            "of a workdir, or merge the seeds of several into --out.")
    parser.add_argument("workdirs", nargs="+", metavar="DIR")
    parser.add_argument("--out", default=None,
                        help="where the merged report goes (required with several DIRs)")
    parser.add_argument("--verbose", action="store_true", help="traceback on errors")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    from dp_jax import report

    def go(_):
        if len(args.workdirs) == 1 and args.out in (None, args.workdirs[0]):
            return report.write_report(args.workdirs[0])
        if not args.out:
            raise ValueError(f"{len(args.workdirs)} workdirs need --out=DIR for the merged report")
        return report.write_report(args.out, sources=args.workdirs)
    print(guarded(go, lambda: args.verbose)(None))


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + error; keep the one-line convention
        fail(f"{self.prog}: {message} (see --help)")


def cmd_eval_mask() -> None:
    """``dp-jax eval-mask``: train and test a mask file under a config's recipe."""
    from absl import app, flags, logging
    from ml_collections import config_flags
    config = config_flags.DEFINE_config_file("config", None, "Experiment config (path or name).",
                                             lock_config=True)
    mask = flags.DEFINE_string("mask", None, "Mask file (npz of bool arrays by parameter path).")
    workdir = flags.DEFINE_string("workdir", None, "Where eval_mask.json is written.")
    seed = flags.DEFINE_integer("seed", None, "Seed of the init and data order (default: "
                                "config.seed).")
    start = flags.DEFINE_enum("start", "init", ["init", "reinit"],
                              "Weights to train: the seed's init, or its re-init key.")
    verbose = flags.DEFINE_bool("verbose", False, "Show the full traceback of an error.")
    flags.mark_flags_as_required(["config", "mask", "workdir"])

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        logging.set_verbosity(logging.WARNING)
        from dp_jax import eval_mask
        res = eval_mask.evaluate_mask(config.value, mask.value, workdir.value,
                                      seed=seed.value, start=start.value)
        print(f"{res['mask']}: sparsity {res['sparsity']:.4f}  test accuracy "
              f"{res['test_accuracy']:.4f}  test loss {res['test_loss']:.4f}")
        print(f"written: {eval_mask.result_path(workdir.value)}")
    sys.argv = _resolved_argv()
    app.run(guarded(main, lambda: verbose.value))


def cmd_export() -> None:
    """``dp-jax export``: one self-describing ticket file of a run's round."""
    from absl import app, flags, logging
    from dp_jax import export
    workdir = flags.DEFINE_string("workdir", None, "A dp_jax workdir.")
    run = flags.DEFINE_string("run", None, "Run label, e.g. imp_k0.")
    seed = flags.DEFINE_integer("seed", None, "Seed of the run.")
    rnd = flags.DEFINE_integer("round", None, "Round to export.")
    out = flags.DEFINE_string("out", None, "Ticket file to write (.npz).")
    source = flags.DEFINE_enum("source", "auto", list(export.SOURCES),
                               "Trained weights: the round checkpoint when kept (auto), "
                               "checkpoint only, or retrain from the start point.")
    verbose = flags.DEFINE_bool("verbose", False, "Show the full traceback of an error.")
    flags.mark_flags_as_required(["workdir", "run", "seed", "round", "out"])

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        logging.set_verbosity(logging.WARNING)  # orbax logs every file it reads at INFO
        meta = export.export_ticket(workdir.value, run.value, seed.value, rnd.value, out.value,
                                    source=source.value)
        check = meta.get("check") or {}
        print(f"{out.value}: {meta['run']} seed {meta['seed']} round {meta['round']}, sparsity "
              f"{meta['sparsity']:.4f}, trained weights {meta['trained_source']}, recorded test "
              f"accuracy {meta['record']['test_accuracy']:.4f}"
              + (f" (re-evaluated {check['test_accuracy']:.4f})" if check else ""))
    app.run(guarded(main, lambda: verbose.value))


def cmd_import_distilled() -> None:
    """``dp-jax import-distilled``: ``python -m dp_jax.distill.convert`` (published sets)."""
    from dp_jax.distill import convert
    sys.exit(convert.main(sys.argv[1:]))


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
    from dp_jax import hugepages
    hugepages.reexec()  # before anything allocates (dp_jax/hugepages.py)
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
