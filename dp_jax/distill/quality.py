"""Entry shim: ``python -m dp_jax.distill.quality`` (dp_jax/reports/distill_quality.py)."""

if __name__ == "__main__":
    import sys

    from dp_jax.reports import distill_quality  # entry shim

    sys.exit(distill_quality.main())
