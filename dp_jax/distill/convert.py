"""Entry shim: ``python -m dp_jax.distill.convert`` (the command line is dp_jax/cli/distill_tools.py;
the importers are dp_jax/distill/importers.py)."""

if __name__ == "__main__":
    import sys

    from dp_jax.cli import distill_tools  # entry shim: the command line lives in dp_jax.cli

    sys.exit(distill_tools.convert_main(sys.argv[1:]))
