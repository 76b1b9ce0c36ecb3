"""What every subcommand shares: ``--config`` resolution, override-key checks and the user-error
convention (one line on stderr, exit status 2)."""

from __future__ import annotations

import argparse
import os
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


def config_spec(argv: list[str]) -> str | None:
    """The value of ``--config`` (``=v`` or `` v``) in ``argv`` (None without one)."""
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a[len("--config="):]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def check_override_keys(argv: list[str]) -> None:
    """Every ``--config.a.b=v`` names a field of the config file (else a one-line ValueError).

    ml_collections would raise a bare AttributeError from inside flag parsing; this names the
    section and lists its valid keys instead.
    """
    spec = config_spec(argv)
    overrides = [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]
    if spec is None:
        return
    # Loaded here once, before absl does: a config's own error (an unknown variant) is then
    # one line instead of absl's flag error wrapping a traceback.
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
    """``sys.argv`` with ``--config`` resolved, its file loaded and its override keys checked;
    a problem is one line and exit status 2."""
    try:
        argv = resolve_config_argv(sys.argv)
        check_override_keys(argv)
    except (FileNotFoundError, ValueError) as e:
        fail(e)
    return argv


def define_plugin_flags() -> tuple:
    """``(--plugins, --trust_workdir_plugins)``: which plugin modules named by a workdir's
    config.json a command reading that workdir may import (docs/extending.md)."""
    plugins = flags.DEFINE_list("plugins", None, "Plugin modules named by the workdir's "
                                "config.json that may be imported (must cover them).")
    trust = flags.DEFINE_bool("trust_workdir_plugins", False, "Import whatever plugin modules "
                              "the workdir's config.json names.")
    return plugins, trust


def check_output(flag: str, path: str, *, file: bool = False) -> None:
    """Refuse, before any work, an output ``--flag=path`` that cannot be written: a directory
    (``file=False``) or a file (``file=True``, checked through its directory)."""
    path = os.path.abspath(path)
    if file and os.path.isdir(path):
        raise ValueError(f"--{flag}={path} is a directory; allowed: a file path")
    if not file and os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--{flag}={path} is a file; allowed: a directory (made if missing)")
    probe = os.path.dirname(path) if file else path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ValueError(f"--{flag}={path}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"--{flag}={path}: {probe} is not writable")


class OneLineParser(argparse.ArgumentParser):
    """argparse with its usage errors as one line and exit status 2 (argparse: usage + error)."""

    def error(self, message):
        fail(f"{self.prog}: {message} (see --help)")


# ---- subcommands ---------------------------------------------------------------------------


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, its errors (an unknown flag, a bad value, a missing required flag)
    printed as one line with exit status 2 like every other user error (absl: two lines, 1)."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(_one_line(str(e)))


def _one_line(message: str) -> str:
    """A flag error whose value's parser raised (config_flags wraps the traceback) as its first
    and last lines: ``flag --config=...: Error whilst parsing config file: ValueError: ...``."""
    lines = [line for line in message.splitlines() if line.strip()]
    if len(lines) <= 1:
        return message
    return lines[0].rstrip(":") + ": " + lines[-1].strip()


def run_app(main: Callable) -> None:
    """``app.run(main)`` with flag and usage errors as one line and exit status 2."""
    def wrapped(argv):
        try:
            return main(argv)
        except app.UsageError as e:
            fail(e)
    app.run(wrapped, flags_parser=parse_flags)

