"""dp_jax: lottery tickets at initialisation with Distilled Pruning, in JAX/Flax."""

from dp_jax.system import versions as _versions

__version__ = "0.1.0"

# Before any number is computed: a JAX release known to miscompile is named with its fix.
_versions.warn_if_known_bad()
