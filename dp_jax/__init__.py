"""dp_jax: lottery tickets at initialisation with Distilled Pruning, in JAX/Flax.

    import dp_jax
    config = dp_jax.load_config("fashion_mnist:smoke", {"prune.method": "imp,dp,random"})
    results = dp_jax.run(config, "runs/quickstart")
    print(results.table())
    results.figure_accuracy_vs_sparsity()

docs/api.md documents the API; dp_jax.models.register and dp_jax.data.register add your own
model and data, dp_jax.methods.register a pruning method (docs/extending.md).
"""

from dp_jax.system import versions as _versions

__version__ = _versions.DP_JAX_VERSION

# Before any number is computed: a JAX release known to miscompile is named with its fix.
_versions.warn_if_known_bad()

_API = ("Results", "load_config", "load_results", "run")
__all__ = list(_API)


_PACKAGES = ("analysis", "config", "data", "distill", "masks", "methods", "models", "pruning",
             "reports", "rng", "rundir", "storage", "system", "tasks", "training")


def __getattr__(name):
    # Loaded on first use: `import dp_jax` stays light for the command line, which
    # re-executes itself (huge pages) before it imports JAX.
    if name in _API:
        from dp_jax.tasks import api  # on first use (see above)
        return getattr(api, name)
    if name in _PACKAGES:  # `dp_jax.models.register(...)` without importing dp_jax.models
        import importlib
        return importlib.import_module(f"dp_jax.{name}")
    raise AttributeError(f"module 'dp_jax' has no attribute {name!r}")
