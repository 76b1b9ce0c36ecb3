"""dp_jax: lottery tickets at initialisation with Distilled Pruning, in JAX/Flax."""

__version__ = "0.1.0"
