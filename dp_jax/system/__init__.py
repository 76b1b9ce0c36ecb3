"""Process-level plumbing: the JAX stack check, huge pages, the compile cache and timer, the
multi-host set-up and progress bars. Imports nothing else of dp_jax."""
