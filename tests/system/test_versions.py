"""The JAX stack check: the known-bad list, its warning, and jax-ml/jax#39103's reproducer."""

import os
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dp_jax.system import versions


def test_known_bad_names_issue_and_fix():
    msgs = versions.known_bad({"jax": "0.10.2", "jaxlib": "0.10.2"})
    assert len(msgs) == 2
    assert all("jax-ml/jax#39103" in m for m in msgs)
    assert 'pip install "jax!=0.10.2"' in msgs[0]
    assert 'pip install "jaxlib!=0.10.2"' in msgs[1]
    assert versions.known_bad({"jax": "0.10.1", "jaxlib": "0.10.1"}) == []
    assert versions.known_bad({"jax": None, "jaxlib": None}) == []


def test_warning_raised_for_known_bad(monkeypatch):
    monkeypatch.setattr(versions, "installed", lambda dist: "0.10.2")
    with pytest.warns(versions.KnownBadJaxWarning, match="jax-ml/jax#39103"):
        versions.warn_if_known_bad()


def test_installed_stack_is_not_known_bad():
    """The environment the suite runs in is one pyproject.toml allows."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", versions.KnownBadJaxWarning)
        versions.warn_if_known_bad()
    assert versions.known_bad() == []


def test_pyproject_excludes_every_known_bad_release():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(root, "pyproject.toml")) as f:
        text = f.read()
    for dist, bad in versions.KNOWN_BAD:
        spec = re.search(rf'^\s*"{dist}([<>=!][^"]*)"', text, re.M)
        assert spec and f"!={bad}" in spec.group(1), (dist, spec)


@pytest.mark.parametrize("dtype,n", [(jnp.float32, 32_769)])
def test_jit_vmapped_matvec_reduction_matches_numpy(dtype, n):
    """jax-ml/jax#39103: on jaxlib 0.10.2 the jitted result of the last row is 1071645696
    instead of (n - 1)**2 = 1073741824."""
    i = jnp.arange(n, dtype=dtype)
    x = jnp.stack((i, jnp.zeros_like(i), jnp.zeros_like(i)), axis=1)
    matrix = jnp.eye(3, dtype=dtype)

    def f(x):
        return jax.vmap(lambda row: jnp.sum((matrix @ row) ** 2))(x)

    expected = np.arange(n, dtype=np.float64) ** 2  # exact in float32 up to 2**24 per element
    got = np.asarray(jax.jit(f)(x), dtype=np.float64)
    np.testing.assert_array_equal(got[-1], expected[-1])
    np.testing.assert_allclose(got, expected, rtol=1e-6)
