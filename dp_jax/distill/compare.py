"""Entry shim: ``python -m dp_jax.distill.compare`` (dp_jax/reports/distill_compare.py)."""

if __name__ == "__main__":
    import sys

    from dp_jax.reports import distill_compare  # entry shim

    sys.exit(distill_compare.main())
