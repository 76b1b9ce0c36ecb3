"""Entry shim: ``python -m dp_jax.analysis`` is ``dp-jax analyze`` (dp_jax/cli/analyze.py)."""

if __name__ == "__main__":
    from dp_jax.cli import analyze  # entry shim: the command line lives in dp_jax.cli

    analyze.run()
