"""What every subcommand shares: ``--config`` resolution, override-key checks and the user-error
convention (one line on stderr, exit status 2)."""

from __future__ import annotations

import sys
from typing import Callable

from absl import app, flags

from dp_jax.config import files as config_files
from dp_jax.config.files import resolve_config
from dp_jax.system import compile_cache

# What a user's input causes (bad values, missing files, a busy workdir, diverged training).
USER_ERRORS = (ValueError, FileNotFoundError, RuntimeError)


# ---- --config: a path or a packaged config's name ------------------------------------------

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
    config = config_files.load_config(spec)
    for dotted in overrides:
        try:
            config_files.check_override_key(config, dotted)
        except ValueError as e:
            raise ValueError(f"--{e}") from None


# ---- user errors: one line, exit 2 -----------------------------------------------------------

def fail(e: BaseException) -> None:
    """Print ``error: <e>`` on stderr and exit with status 2."""
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def guarded(fn: Callable, verbose: Callable[[], bool]) -> Callable:
    """``fn(argv)`` with user errors printed as one line (exit 2) unless ``verbose()``."""
    def wrapper(argv):
        compile_cache.enable()  # before anything compiles
        try:
            return fn(argv)
        except USER_ERRORS as e:
            if verbose():
                raise
            fail(e)
    return wrapper


def resolved_argv() -> list[str]:
    try:
        return resolve_config_argv(sys.argv)
    except FileNotFoundError as e:
        fail(e)


# ---- subcommands ---------------------------------------------------------------------------


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, its errors (an unknown flag, a bad value, a missing required flag)
    printed as one line with exit status 2 like every other user error (absl: two lines, 1)."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(e)


def run_app(main: Callable) -> None:
    """``app.run(main)`` with flag and usage errors as one line and exit status 2."""
    def wrapped(argv):
        try:
            return main(argv)
        except app.UsageError as e:
            fail(e)
    app.run(wrapped, flags_parser=parse_flags)

