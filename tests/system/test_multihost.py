"""Input pipeline and multi-device / multi-host runs.

The streaming pipeline (``dp_jax.data.pipeline``) is checked on TFDS mock data for
determinism, per-epoch reshuffling, disjoint host shards and augmentation output;
``dp_jax.system.distributed`` with 8 fake CPU devices (data-parallel experiment == 1 device)
and with two real processes joined by ``jax.distributed`` over localhost.

This file doubles as the worker script of those subprocess tests
(``python tests/system/test_multihost.py mesh|process ...``): XLA_FLAGS and
``jax.distributed`` must be set up before jax initialises, i.e. in a fresh process.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NUM_MOCK = 48


def _source(name="cifar10", split="train"):
    import tensorflow_datasets as tfds
    return tfds.data_source(name, split=split)


@pytest.fixture
def mock():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=NUM_MOCK):
        yield


def _iter(src, **kw):
    from dp_jax.data import pipeline
    kw.setdefault("global_batch_size", 8)
    kw.setdefault("seed", 0)
    kw.setdefault("process_index", 0)
    kw.setdefault("process_count", 1)
    return pipeline.HostIterator(src, **kw)


def _collect(it):
    with it:
        return list(it)


# ---------------------------------------------------------------------------------------------
# Pipeline

def test_same_seed_same_batches_whatever_the_threading(mock):
    src = _source()
    a = _collect(_iter(src, num_steps=12, augment="crop_flip"))
    b = _collect(_iter(src, num_steps=12, augment="crop_flip", prefetch=1, num_workers=3))
    c = _collect(_iter(src, num_steps=12, augment="crop_flip", seed=1))
    assert [x.step for x in a] == list(range(12))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.x, y.x)
        np.testing.assert_array_equal(x.y, y.y)
    assert any(not np.array_equal(x.x, y.x) for x, y in zip(a, c))


def test_each_epoch_is_a_fresh_permutation(mock):
    it = _iter(_source(), num_steps=0)
    S = it.steps_per_epoch
    assert S == NUM_MOCK // 8
    epochs = [np.concatenate([it.global_indices(e * S + i) for i in range(S)]) for e in range(3)]
    for idx in epochs:  # no repeats within an epoch, full coverage when B divides n
        assert sorted(idx) == list(range(NUM_MOCK))
    assert not np.array_equal(epochs[0], epochs[1])
    assert not np.array_equal(epochs[1], epochs[2])
    np.testing.assert_array_equal(it.permutation(1), _iter(_source(), num_steps=0).permutation(1))


def test_resume_mid_epoch_gives_the_same_tail(mock):
    src = _source()
    full = _collect(_iter(src, num_steps=10, augment="crop_flip"))
    tail = _collect(_iter(src, num_steps=10, start_step=7, augment="crop_flip"))
    assert [b.step for b in tail] == [7, 8, 9]
    for x, y in zip(full[7:], tail):
        np.testing.assert_array_equal(x.x, y.x)


@pytest.mark.parametrize("hosts", [2, 4])
def test_host_shards_are_disjoint_and_form_the_global_batch(mock, hosts):
    src = _source()
    whole = _collect(_iter(src, num_steps=6, augment="crop_flip"))
    shards = [_collect(_iter(src, num_steps=6, augment="crop_flip", process_index=p,
                             process_count=hosts)) for p in range(hosts)]
    for t in range(6):
        idx = [_iter(src, process_index=p, process_count=hosts).indices(t) for p in range(hosts)]
        assert len(set(np.concatenate(idx))) == 8  # disjoint
        np.testing.assert_array_equal(np.concatenate([s[t].x for s in shards]), whole[t].x)
        np.testing.assert_array_equal(np.concatenate([s[t].y for s in shards]), whole[t].y)
    with pytest.raises(ValueError, match="multiple of the 3 processes"):
        _iter(src, process_count=3)


def test_crop_flip_matches_a_loop_reference():
    from dp_jax.data import crops
    rng = np.random.default_rng(0)
    images = rng.integers(1, 256, size=(5, 6, 7, 3), dtype=np.uint8)  # no zeros: padding shows
    offsets, flips = crops.crop_flip_params(rng, 5, pad=2)
    out = crops.crop_flip(images, offsets, flips, pad=2)
    assert out.shape == images.shape and out.dtype == np.uint8
    for i in range(5):
        padded = np.pad(images[i], ((2, 2), (2, 2), (0, 0)))
        ref = padded[offsets[i, 0]:offsets[i, 0] + 6, offsets[i, 1]:offsets[i, 1] + 7]
        np.testing.assert_array_equal(out[i], ref[:, ::-1] if flips[i] else ref)


def test_augmented_batches_have_the_right_shape_and_range(mock):
    from dp_jax.data import preprocess
    cifar = _collect(_iter(_source(), num_steps=2, augment="crop_flip"))
    assert cifar[0].x.shape == (8, 32, 32, 3) and cifar[0].x.dtype == np.float32
    assert cifar[0].y.dtype == np.int32 and cifar[0].y.max() < 10
    assert 0.0 <= cifar[0].x.min() and cifar[0].x.max() <= 1.0
    inet = _collect(_iter(_source("imagenet2012"), num_steps=2, augment="random_resized_crop",
                          image_size=24))
    assert inet[0].x.shape == (8, 24, 24, 3)
    assert 0.0 <= inet[0].x.min() and inet[0].x.max() <= 1.0
    prep = preprocess.fit_preprocessing("standard", cifar[0].x)
    std = _collect(_iter(_source(), num_steps=1, preprocessing=prep))
    np.testing.assert_allclose(std[0].x, preprocess.apply_preprocessing(
        _collect(_iter(_source(), num_steps=1))[0].x, prep), rtol=1e-6)


def test_random_resized_crop_boxes_stay_inside():
    from dp_jax.data import crops
    rng = np.random.default_rng(1)
    for h, w in [(50, 80), (80, 50), (7, 300), (300, 7), (16, 16)]:
        for u in crops.rrc_params(rng, 50):
            top, left, ch, cw = crops.rrc_box(h, w, u)
            assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w and ch and cw
    img = rng.integers(0, 256, size=(40, 60, 3), dtype=np.uint8)
    assert crops.random_resized_crop(img, 16, crops.rrc_params(rng, 1)[0]).shape == (16, 16, 3)


def test_device_crop_flip_returns_a_crop_of_the_padded_batch():
    import jax
    from dp_jax.data import crops
    x = np.random.default_rng(2).normal(size=(6, 4, 5, 2)).astype(np.float32)
    out = np.asarray(jax.jit(crops.device_crop_flip, static_argnames="pad")(
        jax.random.key(0), x, pad=1))
    assert out.shape == x.shape
    for i in range(6):
        padded = np.pad(x[i], ((1, 1), (1, 1), (0, 0)))
        crops = [c for oy in range(3) for ox in range(3)
                 for c in (padded[oy:oy + 4, ox:ox + 5], padded[oy:oy + 4, ox:ox + 5][:, ::-1])]
        assert any(np.array_equal(out[i], c) for c in crops)


def test_errors_in_the_producer_reach_the_consumer():
    class Broken:
        def __len__(self):
            return 16

        def __getitem__(self, i):
            raise OSError(f"record {i} unreadable")

    with pytest.raises(OSError, match="unreadable"):
        _collect(_iter(Broken(), num_steps=2))


def test_class_subset_and_eval_batches(mock, tmp_path):
    from dp_jax.data import pipeline
    src = _source("imagenet2012")
    labels = pipeline.read_labels(src, cache_path=str(tmp_path / "labels.npy"))
    assert (tmp_path / "labels.npy").exists()
    np.testing.assert_array_equal(pipeline.read_labels(src, cache_path=str(tmp_path / "labels.npy")),
                                  labels)
    classes = sorted(set(labels.tolist()))[:5][::-1]
    sub = pipeline.ClassSubset(src, classes, labels)
    assert len(sub) == int(np.isin(labels, classes).sum())
    for i in range(len(sub)):
        assert classes[int(sub[i]["label"])] == labels[sub.index[i]]
    seen = []
    for p in range(2):
        for x, y, w in pipeline.eval_batches(src, global_batch_size=10, image_size=8,
                                             process_index=p, process_count=2):
            assert x.shape == (5, 8, 8, 3) and len(y) == len(w) == 5
            seen.append(int(w.sum()))
    assert sum(seen) == NUM_MOCK
    assert pipeline.evenly_spaced_classes(100, 1000)[:3] == (0, 10, 20)


# ---------------------------------------------------------------------------------------------
# dp_jax.system.distributed in this process (single host)

def test_initialize_is_a_noop_without_multihost():
    from dp_jax.system import distributed
    info = distributed.initialize(distributed.ParallelSettings.from_config())
    assert info["process_count"] == 1 and info["process_index"] == 0
    assert distributed.is_main_process()
    assert distributed.main_process_only(lambda: 7)() == 7
    assert distributed.local_batch_size(64, 4) == 16
    with pytest.raises(ValueError, match="multiple of the 3 processes"):
        distributed.local_batch_size(64, 3)


# ---------------------------------------------------------------------------------------------
# Subprocess tests

def _run(args, timeout=300, env_extra=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu", **(env_extra or {}))
    out = subprocess.run([sys.executable, os.path.abspath(__file__), *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _check_same_rounds(res):
    assert res["devices"] == 8
    single, mesh = res["single"], res["mesh"]
    key = lambda r: (r["method"], r["seed"], r["round"])  # noqa: E731
    assert sorted(map(key, single)) == sorted(map(key, mesh))
    mesh = {key(r): r for r in mesh}
    for r in single:
        m = mesh[key(r)]
        assert r["sparsity"] == pytest.approx(m["sparsity"], abs=1e-9)
        assert r["test_accuracy"] == pytest.approx(m["test_accuracy"], abs=1 / res["num_test"] + 1e-9)


@pytest.mark.slow  # the default run covers this path with a smaller test
def test_data_parallel_on_8_devices_matches_one_device(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    # IMP only: each round's mask depends on the previous round's data-parallel training.
    _check_same_rounds(_run(["mesh", str(tmp_path), "configs/fashion_mnist.py:smoke",
                             "tfds:fashion_mnist", "imp"]))


@pytest.mark.slow
def test_data_parallel_convnet_smoke_on_8_devices(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    _check_same_rounds(_run(["mesh", str(tmp_path), "configs/cifar_convnet.py:smoke", "", ""]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_feed_one_global_batch():
    """Two jax.distributed processes x 2 CPU devices: a global batch assembled from both
    hosts' pipeline shards equals the single-host batch, and a data-parallel SGD step on
    it equals the single-process step."""
    pytest.importorskip("tensorflow_datasets")
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
               JAX_NUM_PROCESSES="2")
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "process"], cwd=ROOT,
                              env=dict(env, JAX_PROCESS_ID=str(p)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for p in range(2)]
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    ref = _process_step(single=True)
    assert sorted(o["process_index"] for o in outs) == [0, 1]
    assert [o["is_main"] for o in sorted(outs, key=lambda o: o["process_index"])] == [True, False]
    for o in outs:
        assert (o["process_count"], o["global_devices"], o["local_devices"]) == (2, 4, 2)
        assert o["checksum"] == pytest.approx(ref["checksum"], rel=1e-6)
        assert o["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        assert o["param_sum"] == pytest.approx(ref["param_sum"], rel=1e-5)


def _experiment_supports_multihost() -> bool:
    # The experiment hooks (distributed.initialize, process-0 writes, replicated state) land
    # together with the Trainer's streaming support; see docs/paper_scale.md.
    from dp_jax.training import trainer as train
    return hasattr(train.Trainer, "train_stream")


@pytest.mark.slow
def test_two_process_experiment_matches_one_process(tmp_path, toy_npz):
    """2 processes x 2 devices write exactly the rounds of 1 process x 4 devices."""
    if not _experiment_supports_multihost():
        pytest.skip("the experiment's multi-host hooks are not in this build")
    methods = "imp,random,reinit:of=imp_k0"
    ref = _run(["experiment", str(tmp_path / "ref"), toy_npz, methods, "4", "0"])
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
               JAX_NUM_PROCESSES="2")
    cmd = [sys.executable, os.path.abspath(__file__), "experiment", str(tmp_path / "mh"), toy_npz,
           methods, "2", "1"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=dict(env, JAX_PROCESS_ID=str(p)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for p in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        assert json.loads(out.strip().splitlines()[-1])["summary"] == ref["summary"]
    from dp_jax.storage import fileio
    keys = ("method", "round", "seed", "sparsity", "test_accuracy", "train_examples")
    rows = [fileio.read_jsonl(str(tmp_path / d / "rounds.jsonl")) for d in ("mh", "ref")]
    assert [[{k: r[k] for k in keys} for r in rs] for rs in rows[:1]] == \
        [[{k: r[k] for k in keys} for r in rs] for rs in rows[1:]]
    for a, b in zip(*rows):  # timings differ; the computed values do not
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Workers (run as scripts)

def _experiment_worker(workdir: str, npz: str, methods: str, multihost: bool) -> dict:
    """The fashion_mnist smoke experiment on a generated dataset, data parallel."""
    from dp_jax.config import files as config_files
    from dp_jax.tasks import prune as experiment
    c = config_files.load_config(os.path.join(ROOT, "configs", "fashion_mnist.py") + ":smoke")
    c.data.name, c.data.train_size = f"npz:{npz}", 0
    c.train.batch_size, c.train.eval_batch_size = 40, 64
    c.prune.method = methods
    c.parallel.data_parallel = True
    c.parallel.multihost = multihost
    summary = experiment.run(c, workdir)
    return {"summary": {k: v["final_test_accuracy_mean"] for k, v in summary["methods"].items()}}


def _mesh_worker(workdir: str, config_spec: str, data_name: str, methods: str) -> dict:
    """Run the smoke experiment on 1 device and data-parallel on 8; return both rounds."""
    import tensorflow_datasets as tfds
    from dp_jax.config import files as config_files
    from dp_jax.tasks import prune as experiment
    from dp_jax.storage import fileio
    path, _, variant = config_spec.partition(":")
    mod = config_files.load_module(os.path.join(ROOT, path))
    out = {}
    for name, dp in (("single", False), ("mesh", True)):
        c = mod.get_config(variant)
        if data_name:
            c.data.name = data_name
        c.data.train_size = 0
        c.train.batch_size = 16  # a multiple of the 8 devices
        c.train.eval_batch_size = 64
        c.parallel.data_parallel = dp
        if methods:
            c.prune.method = methods
        wd = os.path.join(workdir, name)
        with tfds.testing.mock_data(num_examples=64):
            experiment.run(c, wd)
        out[name] = [{k: r[k] for k in ("method", "seed", "round", "sparsity", "test_accuracy")}
                     for r in fileio.read_jsonl(os.path.join(wd, "rounds.jsonl"))]
    import jax
    return dict(out, devices=jax.device_count(), num_test=64)


def _process_step(single: bool) -> dict:
    """One data-parallel SGD step of a linear model on pipeline batches (mock CIFAR-10)."""
    import jax
    import jax.numpy as jnp
    import tensorflow_datasets as tfds
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from dp_jax.system import distributed
    from dp_jax.data import pipeline

    if not single:
        distributed.initialize(distributed.ParallelSettings.from_config(multihost=True))
    pid, count = (0, 1) if single else (jax.process_index(), jax.process_count())
    with tfds.testing.mock_data(num_examples=NUM_MOCK):
        it = pipeline.HostIterator(_source(), global_batch_size=8, seed=5, num_steps=1,
                                   augment="crop_flip", process_index=pid, process_count=count)
        with it:
            batch = next(iter(it))
    mesh = Mesh(np.array(jax.devices()), ("data",))
    data = NamedSharding(mesh, P("data"))
    x = jax.make_array_from_process_local_data(data, batch.x.reshape(len(batch.x), -1))
    y = jax.make_array_from_process_local_data(data, batch.y)
    w = jnp.zeros((x.shape[1], 10), jnp.float32) + 0.01

    def loss(w, x, y):
        logits = x @ w
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, y[:, None], 1)[:, 0])

    @jax.jit
    def step(w, x, y):
        value, g = jax.value_and_grad(loss)(w, x, y)
        return w - 0.1 * g, value, jnp.sum(x * (1 + jnp.arange(x.shape[0])[:, None]))

    w, value, checksum = step(w, x, y)
    out = {"loss": float(value), "param_sum": float(jnp.sum(w)), "checksum": float(checksum)}
    out.update(distributed.process_info(), is_main=distributed.is_main_process())
    if not single:
        distributed.shutdown()
    return out


if __name__ == "__main__":
    mode = sys.argv[1]
    sys.path.insert(0, ROOT)
    if mode == "mesh":
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + " --xla_force_host_platform_device_count=8")
        print(json.dumps(_mesh_worker(*sys.argv[2:6])))
    elif mode == "experiment":
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={sys.argv[5]}")
        print(json.dumps(_experiment_worker(*sys.argv[2:5], multihost=sys.argv[6] == "1")))
    elif mode == "process":
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + " --xla_force_host_platform_device_count=2")
        print(json.dumps(_process_step(single=False)))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
