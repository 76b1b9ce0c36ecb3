"""Training and evaluation from a host stream of minibatches (dp_jax/training/stream.py).

References: the in-memory ``Trainer.train`` fed the very same batches (its own data order
replayed on the host), a hand-written NumPy SGD step, and a NumPy evaluation.
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from dp_jax import masks as masks_lib
from dp_jax.data import pipeline
from dp_jax.models import create_model, init_variables
from dp_jax.pruning import rounds as prune_lib
from dp_jax.training import trainer as train_lib

N, B, C, SHAPE = 48, 12, 3, (4, 4, 1)
S = N // B  # steps per epoch


@pytest.fixture(scope="module")
def parts():
    """Model, uint8 images and labels, the images as model input, init and a half-pruned mask."""
    model = create_model(ml_collections.ConfigDict(dict(name="lenet_300_100")), num_classes=C)
    r = np.random.default_rng(0)
    labels = np.arange(N) % C
    images = np.clip(r.normal(60 + 60 * labels[:, None, None, None], 40, (N,) + SHAPE),
                     0, 255).astype(np.uint8)
    x = images.astype(np.float32) / np.float32(255)
    v = init_variables(model, jax.random.key(0), SHAPE)
    mask = masks_lib.prune(masks_lib.random_scores(v["params"], jax.random.key(1)),
                           masks_lib.ones_like(v["params"]), 0.5)
    return model, images, labels, x, v, mask


class Feed:
    """A batch stream that counts what was read and whether it was closed."""

    def __init__(self, batches):
        self.batches, self.read, self.closed = list(batches), 0, False

    def __iter__(self):
        for b in self.batches:
            self.read += 1
            yield b

    def close(self):
        self.closed = True


def _memory_order(x, y, key, start, stop):
    """The in-memory trainer's batches of steps start..stop-1 (perm of fold_in(key, epoch))."""
    for t in range(start, stop):
        perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, t // S), N))
        idx = perm[(t % S) * B:(t % S + 1) * B]
        yield pipeline.Batch(step=t, x=np.asarray(x)[idx], y=np.asarray(y, np.int32)[idx])


def _tx():
    return optax.sgd(optax.piecewise_constant_schedule(0.05, {6: 0.2}), momentum=0.9)


def _assert_close(a, b, **tol):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) and la
    for p, q in zip(la, lb):
        np.testing.assert_allclose(np.asarray(p), np.asarray(q), **tol)


@pytest.mark.parametrize("loop", ["python", "scan"])
def test_train_stream_equals_in_memory_train_on_the_same_batches(parts, loop):
    """Fed the in-memory order, train_stream gives train's state, snapshots and epoch metrics."""
    model, _, labels, x, v, mask = parts
    tx, key = _tx(), jax.random.key(7)
    tr = train_lib.Trainer(model, tx, batch_size=B, num_train=N, loop=loop)
    tol = dict(rtol=0, atol=0) if loop == "python" else dict(rtol=1e-5, atol=1e-6)
    logs = {"mem": [], "stream": []}
    ref, ref_snaps = tr.train(train_lib.create_state(v, mask, tx), jnp.asarray(x),
                              jnp.asarray(labels), key, 10, snapshot_steps=[0, 3, 8, 10, 99],
                              on_epoch=lambda e, m: logs["mem"].append((e, m)))
    feed = Feed(_memory_order(x, labels, key, 0, 10))
    got, snaps = tr.train_stream(train_lib.create_state(v, mask, tx), feed, key, 10,
                                 snapshot_steps=[0, 3, 8, 10, 99],
                                 on_epoch=lambda e, m: logs["stream"].append((e, m)))
    assert int(got.step) == 10 and feed.closed
    _assert_close(got.params, ref.params, **tol)
    _assert_close(got.opt_state, ref.opt_state, **tol)
    assert sorted(snaps) == sorted(ref_snaps) == [0, 3, 8, 10]
    for k in snaps:
        _assert_close(snaps[k], ref_snaps[k], **tol)
    assert [e for e, _ in logs["stream"]] == [e for e, _ in logs["mem"]] == [0, 1, 2]
    for (_, a), (_, b) in zip(logs["stream"], logs["mem"]):
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-5) for k in a)
    for p, m in zip(jax.tree.leaves(got.params), jax.tree.leaves(mask)):
        assert not np.any(np.asarray(p)[~np.asarray(m)])  # pruned weights stay zero


def test_train_stream_resumes_at_the_states_step(parts):
    """Stopping at step 6 and continuing from that state to 10 equals one run to 10."""
    model, _, labels, x, v, mask = parts
    tx, key = _tx(), jax.random.key(3)
    tr = train_lib.Trainer(model, tx, batch_size=B, num_train=N, loop="python")
    whole, _ = tr.train_stream(train_lib.create_state(v, mask, tx),
                               Feed(_memory_order(x, labels, key, 0, 10)), key, 10)
    half, _ = tr.train_stream(train_lib.create_state(v, mask, tx),
                              Feed(_memory_order(x, labels, key, 0, 6)), key, 6)
    assert int(half.step) == 6
    at6 = jax.tree.map(jnp.copy, half.params)
    epochs = []
    rest, snaps = tr.train_stream(half, Feed(_memory_order(x, labels, key, 6, 10)), key, 10,
                                  snapshot_steps=[2, 6], on_epoch=lambda e, m: epochs.append(e))
    assert sorted(snaps) == [6] and epochs == [1, 2]  # the epoch of step 6 ends at 8
    _assert_close(snaps[6]["params"], at6, rtol=0, atol=0)
    _assert_close(rest.params, whole.params, rtol=0, atol=0)
    _assert_close(rest.opt_state, whole.opt_state, rtol=0, atol=0)


def test_one_streamed_step_is_numpy_masked_sgd(parts):
    """One streamed step of plain SGD equals a hand-written NumPy forward/backward/update."""
    model, _, labels, x, v, mask = parts
    lr = 0.1
    tr = train_lib.Trainer(model, optax.sgd(lr), batch_size=B, num_train=N, loop="python")
    xb, yb = x[5:5 + B], labels[5:5 + B].astype(np.int32)
    seen = []
    got, _ = tr.train_stream(train_lib.create_state(v, mask, optax.sgd(lr)),
                             Feed([pipeline.Batch(step=0, x=xb, y=yb)]), jax.random.key(0), 1,
                             on_epoch=lambda e, m: seen.append(m))
    m = {k: np.asarray(mask[k]["kernel"], np.float64) for k in ("fc1", "fc2", "head")}
    W = {k: np.asarray(v["params"][k]["kernel"], np.float64) * m[k] for k in m}
    b = {k: np.asarray(v["params"][k]["bias"], np.float64) for k in m}
    h0 = xb.reshape(B, -1).astype(np.float64)
    h1 = np.maximum(h0 @ W["fc1"] + b["fc1"], 0)
    h2 = np.maximum(h1 @ W["fc2"] + b["fc2"], 0)
    z = h2 @ W["head"] + b["head"]
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    loss = -np.mean(np.log(p[np.arange(B), yb]))
    dz = (p - np.eye(C)[yb]) / B
    d2 = (dz @ W["head"].T) * (h2 > 0)
    d1 = (d2 @ W["fc2"].T) * (h1 > 0)
    grads = {"head": (h2.T @ dz, dz.sum(0)), "fc2": (h1.T @ d2, d2.sum(0)),
             "fc1": (h0.T @ d1, d1.sum(0))}
    for k, (gw, gb) in grads.items():
        np.testing.assert_allclose(got.params[k]["kernel"], (W[k] - lr * gw) * m[k],
                                   rtol=1e-4, atol=1e-6, err_msg=k)
        np.testing.assert_allclose(got.params[k]["bias"], b[k] - lr * gb, rtol=1e-4,
                                   atol=1e-6, err_msg=k)
    assert seen[0]["loss"] == pytest.approx(loss, rel=1e-5)
    assert seen[0]["accuracy"] == pytest.approx(np.mean(z.argmax(1) == yb))


def test_stream_errors_name_the_step_and_always_close(parts):
    """Wrong-step and short streams raise, extra batches stay unread, the stream always closes."""
    model, _, labels, x, v, mask = parts
    tx, key = optax.sgd(0.01), jax.random.key(0)
    tr = train_lib.Trainer(model, tx, batch_size=B, num_train=N, loop="python")
    batches = list(_memory_order(x, labels, key, 0, 8))
    feed = Feed(batches[1:])
    with pytest.raises(ValueError, match="step 1 arrived at step 0"):
        tr.train_stream(train_lib.create_state(v, mask, tx), feed, key, 4)
    assert feed.closed
    feed = Feed(batches[:3])
    with pytest.raises(ValueError, match="ended at step 3, before step 5"):
        tr.train_stream(train_lib.create_state(v, mask, tx), feed, key, 5)
    assert feed.closed
    feed = Feed(batches)
    state, _ = tr.train_stream(train_lib.create_state(v, mask, tx), feed, key, 4)
    assert int(state.step) == 4 and feed.closed and feed.read <= 5


def _numpy_eval(params, mask, x, y):
    w = {k: {n: np.asarray(a, np.float64) * np.asarray(mask[k][n]) for n, a in d.items()}
         for k, d in params.items()}
    h = np.asarray(x, np.float64).reshape(len(x), -1)
    for k in ("fc1", "fc2"):
        h = np.maximum(h @ w[k]["kernel"] + w[k]["bias"], 0)
    z = h @ w["head"]["kernel"] + w["head"]["bias"]
    z = z - z.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    return float(np.mean(z.argmax(1) == y)), float(-logp[np.arange(len(y)), y].mean())


def test_evaluate_stream_counts_every_example_once(parts):
    """evaluate_stream over padded batches (20, 20, 8 + 12 pad) equals NumPy and evaluate."""
    model, images, labels, x, v, mask = parts
    tr = train_lib.Trainer(model, optax.sgd(0.1), batch_size=B, num_train=N)
    params = jax.tree.map(lambda a: a * 3.0, v["params"])  # sharper logits: a non-trivial loss
    source = [{"image": im, "label": int(c)} for im, c in zip(images, labels)]
    ev = tr.evaluate_stream(params, {}, mask, pipeline.eval_batches(source, global_batch_size=20),
                            N)
    acc, loss = _numpy_eval(params, mask, x, labels)
    assert ev["accuracy"] == pytest.approx(acc, abs=1e-6)
    assert ev["loss"] == pytest.approx(loss, rel=1e-5)
    assert ev == pytest.approx(tr.evaluate(params, {}, mask, jnp.asarray(x), jnp.asarray(labels)))


def test_host_iterator_epoch_trains_like_train_on_the_same_examples(parts):
    """A real HostIterator epoch equals Trainer.train on data laid out to give the same batches."""
    model, images, labels, x, v, mask = parts
    tx, key = _tx(), jax.random.key(11)
    tr = train_lib.Trainer(model, tx, batch_size=B, num_train=N, loop="python")
    source = [{"image": im, "label": int(c)} for im, c in zip(images, labels)]
    it = pipeline.HostIterator(source, global_batch_size=B, seed=4, num_steps=S,
                               process_index=0, process_count=1)
    order = np.concatenate([it.global_indices(t) for t in range(S)])
    assert sorted(order) == list(range(N)) and not np.array_equal(order, np.arange(N))
    perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, 0), N))
    xm, ym = np.empty_like(x), np.empty_like(labels)
    xm[perm], ym[perm] = x[order], labels[order]
    ref, _ = tr.train(train_lib.create_state(v, mask, tx), jnp.asarray(xm), jnp.asarray(ym),
                      key, S)
    got, _ = tr.train_stream(train_lib.create_state(v, mask, tx), it, key, S)
    _assert_close(got.params, ref.params, rtol=0, atol=0)


@dataclasses.dataclass
class FakeStream:
    """A StreamingData stand-in replaying the in-memory order of ``key``."""
    x: np.ndarray
    y: np.ndarray
    key: jax.Array
    test: list
    calls: list = dataclasses.field(default_factory=list)

    def train_iterator(self, *, global_batch_size, seed, start_step, num_steps):
        self.calls.append((global_batch_size, seed, start_step, num_steps))
        return Feed(_memory_order(self.x, self.y, self.key, start_step, num_steps))

    def eval_batches(self, *, global_batch_size):
        return pipeline.eval_batches(self.test, global_batch_size=global_batch_size)


def test_round_training_takes_the_stream_path_like_memory(parts):
    """train_and_eval's stream path equals the in-memory one; its seed ignores start_step."""
    model, images, labels, x, v, mask = parts
    tx, key = _tx(), jax.random.key(5)
    tr = train_lib.Trainer(model, tx, batch_size=B, num_train=N, loop="python",
                           eval_batch_size=20)
    source = [{"image": im, "label": int(c)} for im, c in zip(images, labels)]
    mem = prune_lib.Setup(model=model, trainer=tr, tx=tx, x_train=jnp.asarray(x),
                          y_train=jnp.asarray(labels), x_test=jnp.asarray(x),
                          y_test=jnp.asarray(labels), image_shape=SHAPE, num_steps=10, rounds=1,
                          fraction=0.5, scope="global", on_empty_layer="ignore", init_fn=None)
    fake = FakeStream(x, labels, key, source)
    streamed = dataclasses.replace(mem, stream=fake)
    s_ref, ev_ref, snaps_ref, tm_ref = prune_lib.train_and_eval(mem, v, mask, key,
                                                                snapshot_steps=[4])
    s_got, ev_got, snaps_got, tm_got = prune_lib.train_and_eval(streamed, v, mask, key,
                                                                snapshot_steps=[4])
    _assert_close(s_got.params, s_ref.params, rtol=0, atol=0)
    _assert_close(snaps_got[4], snaps_ref[4], rtol=0, atol=0)
    assert ev_got == pytest.approx(ev_ref) and tm_got == pytest.approx(tm_ref)
    prune_lib.train_and_eval(streamed, snaps_got[4], mask, key, start_step=4)
    (b0, seed0, st0, n0), (b1, seed1, st1, n1) = fake.calls
    assert (b0, st0, n0, b1, st1, n1) == (B, 0, 10, B, 4, 10)
    assert seed0 == seed1 and 0 <= seed0 < 2 ** 31
