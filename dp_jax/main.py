"""Entry shim: ``python -m dp_jax.main`` is ``dp-jax run`` (dp_jax/cli/run.py)."""

if __name__ == "__main__":
    from dp_jax.cli import run  # entry shim: the command line lives in dp_jax.cli

    run.run()
