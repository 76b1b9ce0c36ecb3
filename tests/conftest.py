"""Shared fixtures: a small generated image-classification dataset and tiny experiment configs."""

import os
import signal
import subprocess
import time

import numpy as np
import pytest

from dp_jax.config import files as config_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    """The tests share JAX's persistent compilation cache with the command lines they start
    (dp_jax/system/compile_cache.py; DP_JAX_COMPILE_CACHE=off disables it)."""
    from dp_jax.system import compile_cache
    compile_cache.enable()


def load_config_module(name: str):
    """Import ``configs/<name>.py`` (configs are files, not a package)."""
    return config_files.load_module(os.path.join(ROOT, "configs", f"{name}.py"))


def make_npz(path, *, n_train=200, n_test=100, shape=(8, 8, 1), num_classes=10, seed=0):
    """A learnable toy dataset: class-dependent mean images plus noise, uint8."""
    rng = np.random.default_rng(seed)
    protos = rng.uniform(0, 255, size=(num_classes,) + shape)

    def split(n):
        y = np.arange(n) % num_classes
        rng.shuffle(y)
        x = np.clip(protos[y] + rng.normal(0, 40, size=(n,) + shape), 0, 255).astype(np.uint8)
        return x, y.astype(np.int64)

    x_train, y_train = split(n_train)
    x_test, y_test = split(n_test)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return str(path)


def make_distilled(config, path, per_class=2):
    """A 'distilled' set: the first real training images of each class, in model input space."""
    from dp_jax import distill
    from dp_jax.data import load_dataset
    ds = load_dataset(config.data, seed=config.seed)
    idx = np.concatenate([np.flatnonzero(ds.y_train == c)[:per_class] for c in range(ds.num_classes)])
    distill.save_distilled(path, distill.DistilledSet(
        images=ds.x_train[idx], labels=ds.y_train[idx], lr=0.02, preprocessing=ds.preprocessing,
        dataset=ds.name))
    return path


@pytest.fixture(scope="session")
def toy_npz(tmp_path_factory):
    """Path of a generated 8x8x1, 10-class npz dataset (200 train / 100 test)."""
    return make_npz(tmp_path_factory.mktemp("data") / "toy.npz")


@pytest.fixture
def tiny_config(toy_npz):
    """The default experiment's config shrunk to seconds, on the generated dataset."""
    c = load_config_module("fashion_mnist").get_config("smoke")
    c.data.name = f"npz:{toy_npz}"
    c.data.train_size = 0
    c.train.batch_size = 40
    c.train.epochs = 2
    c.train.eval_batch_size = 64
    return c


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory):
    """60 train / 30 test 8x8 grayscale images of 3 classes (a bright band per class)."""
    rng = np.random.default_rng(0)

    def make(n):
        y = np.arange(n) % 3
        x = rng.random((n, 8, 8)) * 0.3
        for i, c in enumerate(y):
            x[i, 2 * c:2 * c + 3, :] += 0.6
        return (np.clip(x, 0, 1) * 255).astype(np.uint8), y
    (xt, yt), (xs, ys) = make(60), make(30)
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    np.savez(path, x_train=xt, y_train=yt, x_test=xs, y_test=ys)
    return str(path)


def kill_then_resume(cmd, workdir, marker, env, timeout=180):
    """Start ``cmd``, SIGKILL it once ``marker`` (a path under ``workdir``) exists, run it again.

    Asserts the kill came mid-run (the process was still alive and wrote no summary).
    """
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not os.path.exists(marker) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(workdir, "summary.json"))
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)


def assert_rejected(config, field, value, match, workdir):
    """Setting ``field`` (``section.name``) to ``value`` fails with ``match`` and writes nothing."""
    from dp_jax.tasks import prune as experiment
    section, name = field.split(".")
    config[section][name] = value
    with pytest.raises(ValueError, match=match):
        experiment.run(config, str(workdir))
    assert not os.path.exists(workdir), "a rejected run wrote to its workdir"
