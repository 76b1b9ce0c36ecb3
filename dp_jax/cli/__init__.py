"""The command lines: ``dp-jax`` and its subcommands (``main``), the experiment (``run``), the
analyses (``analyze``), the distillation tools (``distill_tools``) and what they share
(``common``). absl and argparse live here only."""
