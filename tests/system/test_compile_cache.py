"""The persistent compilation cache and compile-time accounting."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from dp_jax.system import compile_cache, compile_time
from dp_jax.storage import fileio
from dp_jax.rundir import paths as workdir

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_cache_dir_from_the_environment(tmp_path):
    assert compile_cache.cache_dir({}) == os.path.expanduser(compile_cache.DEFAULT_DIR)
    assert compile_cache.cache_dir({compile_cache.ENV: str(tmp_path)}) == str(tmp_path)
    for off in ("off", "0", "none", ""):
        assert compile_cache.cache_dir({compile_cache.ENV: off}) is None


def test_compile_time_counts_compilations_only():
    f = jax.jit(lambda x: jnp.tanh(x) @ x.T + jnp.float32(len(str(x.shape))))
    x = jnp.ones((31, 17))
    c0 = compile_time.seconds()
    f(x).block_until_ready()
    first = compile_time.seconds() - c0
    c1 = compile_time.seconds()
    for _ in range(3):
        f(x).block_until_ready()
    assert first > 0 and compile_time.seconds() - c1 == 0.0  # cached calls compile nothing


def _run(tmp_path, wd, cache):
    cmd = [sys.executable, "-m", "dp_jax.main", "--config=configs/fashion_mnist.py:smoke",
           f"--workdir={wd}", "--config.prune.rounds=1", "--config.prune.method=imp",
           "--config.data.train_size=200", "--config.train.epochs=1",
           "--config.metrics.tensorboard=False"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", **{compile_cache.ENV: cache})
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return fileio.read_json(workdir.summary_path(wd))


@pytest.mark.slow  # two full processes; the cache's keys and settings are tested above
def test_a_second_process_reads_the_programs_from_the_cache(tmp_path):
    cache = str(tmp_path / "cache")
    cold = _run(tmp_path, str(tmp_path / "a"), cache)
    stored = [f for f in os.listdir(cache) if f.endswith("-cache")]
    assert stored and cold["compile_cache"]["hits"] == 0
    assert cold["compile_cache"]["misses"] >= len(stored)
    warm = _run(tmp_path, str(tmp_path / "b"), cache)
    assert warm["compile_cache"]["hits"] == len(stored)  # every stored program was reused
    # The warm process loads its programs and ends with the same results.
    rows_a = fileio.read_jsonl(workdir.rounds_path(str(tmp_path / "a")))
    rows_b = fileio.read_jsonl(workdir.rounds_path(str(tmp_path / "b")))
    assert [r["test_accuracy"] for r in rows_a] == [r["test_accuracy"] for r in rows_b]
    assert all("compile_s" in r for r in rows_a)
