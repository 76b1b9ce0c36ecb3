"""Entry shim: ``python -m dp_jax.report DIR [DIR ...] [--out=DIR]`` is ``dp-jax report``."""

if __name__ == "__main__":
    from dp_jax.cli import main  # entry shim: the command line lives in dp_jax.cli

    main.cmd_report()
