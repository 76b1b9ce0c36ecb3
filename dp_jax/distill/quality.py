"""Entry shim: ``python -m dp_jax.distill.quality`` (dp_jax/reports/distill_quality.py)."""

if __name__ == "__main__":
    import sys

    from dp_jax.cli import distill_tools  # entry shim: the command line lives in dp_jax.cli

    sys.exit(distill_tools.quality_main())
