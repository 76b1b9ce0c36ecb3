"""``python -m dp_jax.cli <command> ...``: the ``dp-jax`` console script."""

from dp_jax.cli.main import main

main()
