"""FORCE against an independent NumPy computation (forward/backward of a 2-layer MLP with softmax
cross-entropy, every iteration's scores and mask), plus the method's schedule, cost and checks."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dp_jax import masks
from dp_jax.methods import saliency
from dp_jax.tasks import prune as experiment

KEYS = ("fc1/kernel", "head/kernel")  # the prunable leaves, in masks' (sorted) order


class MLP(nn.Module):
    """x -> Dense 12 (fc1) -> ReLU -> Dense 3 (head)."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(nn.Dense(12, name="fc1")(x.reshape((x.shape[0], -1))))
        return nn.Dense(3, name="head")(x)


def _np_grads(p: dict, x: np.ndarray, y: np.ndarray) -> dict:
    """d(mean softmax cross-entropy)/d(kernels) of the MLP at weights ``p`` (float64)."""
    pre = x @ p["fc1/kernel"] + p["fc1/bias"]
    h = np.maximum(pre, 0)
    z = h @ p["head/kernel"] + p["head/bias"]
    e = np.exp(z - z.max(1, keepdims=True))
    dz = (e / e.sum(1, keepdims=True) - np.eye(3)[y]) / len(y)
    dpre = (dz @ p["head/kernel"].T) * (pre > 0)
    return {"fc1/kernel": x.T @ dpre, "head/kernel": h.T @ dz}


def _np_force_scores(theta: dict, mask: dict, batches) -> dict:
    """|theta * dL/dw| at w = theta * mask: the gradient of the sparsified net w.r.t. w."""
    w = {k: theta[k] * mask[k] if k in mask else theta[k] for k in theta}
    g = [_np_grads(w, x, y) for x, y in batches]
    return {k: np.abs(theta[k] * sum(gi[k] for gi in g) / len(g)) for k in KEYS}


def _np_prune(scores: dict, alive: dict, p: float):
    """Remove round(p * alive) of ``alive``'s weights with the lowest scores, ties by position
    in the concatenation; also the gap between the last removed and first kept score."""
    s = np.concatenate([scores[k].ravel() for k in KEYS])
    a = np.concatenate([alive[k].ravel() for k in KEYS])
    idx = np.flatnonzero(a)
    n = int(round(p * idx.size))
    order = idx[np.lexsort((idx, s[idx]))]
    keep = a.copy()
    keep[order[:n]] = False
    out, off = {}, 0
    for k in KEYS:
        out[k] = keep[off:off + alive[k].size].reshape(alive[k].shape)
        off += alive[k].size
    return out, s[order[n]] - s[order[n - 1]]


def _setup():
    rng = np.random.default_rng(3)
    model = MLP()
    x0 = jnp.zeros((1, 4, 4, 1))
    variables = model.init(jax.random.key(0), x0)
    batches = {t: [(rng.normal(size=(16, 4, 4, 1)).astype(np.float32), rng.integers(0, 3, 16))
                   for _ in range(2)] for t in range(1, 9)}
    return model, variables, batches


def _run(model, variables, mask, batches, fraction, iters):
    got = {}
    final = saliency.force_prune(
        model, variables, mask, lambda t: batches[t], fraction=fraction, iters=iters,
        prune_fn=lambda s, m, p: masks.prune(s, m, p),
        on_iteration=lambda t, m: got.update({t: {k: np.asarray(v) for k, v in
                                                  masks.prunable_leaves(m).items()}}))
    return final, got


def _reference(theta, start, batches, fraction, iters):
    """Every iteration's mask, computed with NumPy alone."""
    out, current, gaps = {}, dict(start), []
    for t in range(1, iters + 1):
        p = fraction if t == iters else 1 - (1 - fraction) ** (t / iters)
        flat_x = [(x.reshape(len(x), -1).astype(np.float64), y) for x, y in batches[t]]
        scores = _np_force_scores(theta, current, flat_x)
        new, gap = _np_prune(scores, start, p)
        gaps.append(gap)
        current = dict(current, **new)
        out[t] = new
    return out, min(gaps)


def test_force_iterations_match_numpy_exactly():
    model, variables, batches = _setup()
    theta = {masks.path_str(p): np.asarray(v, np.float64) for p, v in
             jax.tree_util.tree_flatten_with_path(variables["params"])[0]}
    dense = masks.ones_like(variables["params"])
    # Round 1: dense -> 20 % in 4 iterations; kept shares 0.8^(1/4)... of 0.2^(t/4).
    final, got = _run(model, variables, dense, batches, 0.8, 4)
    want, gap = _reference(theta, {k: np.ones(theta[k].shape, bool) for k in KEYS}, batches,
                           0.8, 4)
    assert gap > 1e-6  # float32 vs float64 cannot swap a kept and a removed weight
    total = sum(theta[k].size for k in KEYS)
    for t in range(1, 5):
        for k in KEYS:
            np.testing.assert_array_equal(got[t][k], want[t][k], err_msg=(t, k))
        kept = sum(int(got[t][k].sum()) for k in KEYS)
        assert kept == total - round((1 - 0.2 ** (t / 4)) * total)
    # Weights come back: some weight pruned at an iteration is kept at a later one.
    assert any(np.any(~got[t][k] & got[t + 1][k]) for t in range(1, 4) for k in KEYS)
    # Round 2 from that mask: 50 % more in 3 iterations; nothing outside it returns.
    start = {k: np.asarray(v) for k, v in masks.prunable_leaves(final).items()}
    _, got2 = _run(model, variables, final, batches, 0.5, 3)
    want2, gap2 = _reference(theta, start, batches, 0.5, 3)
    assert gap2 > 1e-6
    for t in range(1, 4):
        for k in KEYS:
            np.testing.assert_array_equal(got2[t][k], want2[t][k], err_msg=(t, k))
            assert not np.any(got2[t][k] & ~start[k])


def test_force_scores_differ_from_snip_at_pruned_weights():
    model, variables, batches = _setup()
    dense = masks.ones_like(variables["params"])
    half = masks.prune(masks.magnitude_scores(variables["params"]), dense, 0.5)
    f = masks.prunable_leaves(saliency.force_scores(model, variables, half, batches[1]))
    s = masks.prunable_leaves(saliency.snip_scores(model, variables, half, batches[1]))
    for k in KEYS:
        pruned = ~np.asarray(masks.prunable_leaves(half)[k])
        assert np.all(np.asarray(s[k])[pruned] == 0)      # SNIP: pruned weights score 0
        assert np.mean(np.asarray(f[k])[pruned] > 0) > 0.5  # FORCE scores them (dead units: 0)
        np.testing.assert_allclose(np.asarray(f[k])[~pruned], np.asarray(s[k])[~pruned],
                                   rtol=1e-5)


@pytest.mark.parametrize("entry,match", [
    ("force:iters=0", r"prune.method: force: iters .* must be >= 1, got '0'"),
    ("force:iters=two", r"prune.method: force: iters .* must be an integer"),
    ("force:oneshot", r"option 'oneshot' is not valid for 'force'; allowed: iters=VALUE"),
])
def test_bad_force_entries_fail_before_any_work(tiny_config, tmp_path, entry, match):
    tiny_config.prune.method = entry
    with pytest.raises(ValueError, match=match):
        experiment.run(tiny_config, str(tmp_path / "wd"))
    assert not (tmp_path / "wd").exists()


def test_force_refuses_streamed_data_and_bad_score_batches(tiny_config, tmp_path):
    tiny_config.prune.method = "force"
    tiny_config.prune.score_batches = 0
    with pytest.raises(ValueError, match="prune.score_batches"):
        experiment.run(tiny_config, str(tmp_path / "wd"))
    assert not (tmp_path / "wd").exists()
