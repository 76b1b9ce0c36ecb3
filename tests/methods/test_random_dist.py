"""random:dist=erk|uniform: layer densities against hand computations of the ERK formula,
exact per-layer counts, nested masks, seeded draws, and the option's checks."""

import math
import types
from fractions import Fraction as F

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dp_jax import masks, methods, rng
from dp_jax.methods import random as random_method
from dp_jax.tasks import prune as experiment

# A 3-layer net: a conv kernel (kh, kw, in, out) and two dense kernels (in, out).
SHAPES = {"conv/kernel": (3, 3, 2, 4), "fc/kernel": (64, 16), "head/kernel": (16, 4)}
N = 72 + 1024 + 64
# ERK ratios (kh + kw + in + out) / (kh kw in out), resp. (in + out) / (in out), times n_l:
#   conv 12/72 * 72 = 12, fc 80/1024 * 1024 = 80, head 20/64 * 64 = 20  (sum 112).


def _params():
    rng_ = np.random.default_rng(0)
    params = {k.split("/")[0]: {"kernel": jnp.asarray(rng_.normal(size=s), jnp.float32),
                                "bias": jnp.zeros(s[-1], jnp.float32)} for k, s in SHAPES.items()}
    return params


def _setup(fraction=0.5, min_per_layer=1, layer_rates=None):
    return types.SimpleNamespace(fraction=fraction, min_per_layer=min_per_layer,
                                 layer_rates=layer_rates or {}, on_empty_layer="warn",
                                 scope="global")


def _counts(mask):
    return {k: int(np.asarray(v).sum()) for k, v in masks.prunable_leaves(mask).items()}


def test_erk_densities_match_the_formula_worked_by_hand():
    # 25 % kept: K = 290, eps = 290 / 112, no layer reaches 1 (head: 20/64 * 290/112 = 0.81).
    d = random_method.erk_densities(SHAPES, 290)
    assert d["conv/kernel"] == pytest.approx(F(12, 72) * F(290, 112))
    assert d["fc/kernel"] == pytest.approx(F(80, 1024) * F(290, 112))
    assert d["head/kernel"] == pytest.approx(F(20, 64) * F(290, 112))
    # 50 %: K = 580; head would get 20/64 * 580/112 = 1.62 > 1: dense (64 weights), and
    # eps = (580 - 64) / (12 + 80) for the rest.
    d = random_method.erk_densities(SHAPES, 580)
    assert d["head/kernel"] == 1.0
    assert d["conv/kernel"] == pytest.approx(F(12, 72) * F(516, 92))   # 0.935
    assert d["fc/kernel"] == pytest.approx(F(80, 1024) * F(516, 92))
    # 60 %: K = 696; head dense, then conv: 12/72 * 632/92 = 1.145 > 1 dense too, and
    # eps = (696 - 64 - 72) / 80 = 7: fc keeps 560 of 1024.
    d = random_method.erk_densities(SHAPES, 696)
    assert d == {"conv/kernel": 1.0, "fc/kernel": pytest.approx(560 / 1024), "head/kernel": 1.0}
    # Uniform: the same density everywhere.
    assert random_method.erk_densities(SHAPES, 290, uniform=True) == pytest.approx(
        {k: 0.25 for k in SHAPES})
    assert random_method.erk_densities(SHAPES, N) == {k: 1.0 for k in SHAPES}
    for kept in (290, 580, 696):  # the kept count is met exactly (before rounding)
        d = random_method.erk_densities(SHAPES, kept)
        assert math.isclose(sum(d[k] * math.prod(s) for k, s in SHAPES.items()), kept)


def test_apportion_sums_exactly_and_respects_the_bounds():
    # Targets 67.30 / 448.70 / 64 (the 50 % ERK case): floors 67 + 448 + 64 = 579, fc has the
    # larger remainder.
    got = random_method.apportion({"a": 67.30, "b": 448.70, "c": 64.0},
                                  {"a": 1, "b": 1, "c": 1}, {"a": 72, "b": 1024, "c": 64}, 580)
    assert got == {"a": 67, "b": 449, "c": 64}
    # A layer capped by its survivors hands its share to the others.
    assert random_method.apportion({"a": 5.5, "b": 4.5}, {"a": 0, "b": 0}, {"a": 3, "b": 9},
                                   10) == {"a": 3, "b": 7}
    # The collapse guard wins over the total, as in masks.prune.
    assert random_method.apportion({"a": 0.2, "b": 0.3, "c": 1.5}, {"a": 1, "b": 1, "c": 1},
                                   {"a": 5, "b": 5, "c": 5}, 2) == {"a": 1, "b": 1, "c": 1}


def test_erk_rounds_have_the_hand_computed_per_layer_counts_and_nest():
    setup, mask = _setup(0.5), masks.ones_like(_params())
    scores = masks.random_scores(_params(), jax.random.key(1))
    # Round 1 keeps 580: conv 12 * 516/92 = 67.30, fc 80 * 516/92 = 448.70, head 64 (dense).
    c1 = random_method.layer_counts(mask, setup, "erk")
    assert c1 == {"conv/kernel": 67, "fc/kernel": 449, "head/kernel": 64}
    m1 = random_method.keep_random(scores, mask, c1)
    assert _counts(m1) == c1
    # Round 2 keeps 290 = 31.07 + 207.14 + 51.79 (eps = 290/112): 31, 207 and 52.
    c2 = random_method.layer_counts(m1, setup, "erk")
    assert c2 == {"conv/kernel": 31, "fc/kernel": 207, "head/kernel": 52}
    m2 = random_method.keep_random(masks.random_scores(_params(), jax.random.key(2)), m1, c2)
    assert _counts(m2) == c2
    for k, v in masks.prunable_leaves(m2).items():
        assert not np.any(np.asarray(v) & ~np.asarray(masks.prunable_leaves(m1)[k]))
    # Biases are never pruned.
    assert all(np.all(np.asarray(m2[k]["bias"])) for k in m2)


def test_uniform_and_layer_rates():
    setup, mask = _setup(0.5), masks.ones_like(_params())
    assert random_method.layer_counts(mask, setup, "uniform") == {
        "conv/kernel": 36, "fc/kernel": 512, "head/kernel": 32}
    # head at half the rate on its own (64 - round(0.25 * 64) = 48); the pool (conv, fc: 1096)
    # keeps 548: eps = 548 / 92, conv 12 eps = 71.48, fc 80 eps = 476.52 -> 71, 477.
    rated = random_method.layer_counts(mask, _setup(0.5, layer_rates={"head": 0.5}), "erk")
    assert rated == {"conv/kernel": 71, "fc/kernel": 477, "head/kernel": 48}


def _plan(seed, dist):
    params = _params()
    ctx = methods.Context(setup=_setup(0.5), workdir="", seed=seed, seed_key=rng.seed_key(seed),
                          dense={"variables": {"params": params}}, config=None)
    spec = methods.parse(f"random:dist={dist}", None, check=False)[0]
    return methods.get("random").plan(spec, ctx), {"params": params}


def _bits(mask):
    return np.concatenate([np.asarray(v).ravel() for v in masks.prunable_leaves(mask).values()])


def test_masks_are_seeded_random_and_reproducible():
    plan_a, trained = _plan(0, "erk")
    plan_b, _ = _plan(0, "erk")
    plan_c, _ = _plan(1, "erk")
    ones = masks.ones_like(trained["params"])
    a1, b1, c1 = (p.next_mask(1, ones, trained) for p in (plan_a, plan_b, plan_c))
    np.testing.assert_array_equal(_bits(a1), _bits(b1))
    assert not np.array_equal(_bits(a1), _bits(c1))
    assert _counts(a1) == _counts(c1)  # another draw of the same counts
    a2 = plan_a.next_mask(2, a1, trained)
    assert not np.any(_bits(a2) & ~_bits(a1))
    # Random within the layer: the 449 kept of fc's 1024 are spread over it, not its first ones.
    kept = np.asarray(masks.prunable_leaves(a1)["fc/kernel"]).ravel()
    assert 0.35 < kept[:512].mean() < 0.53 and 0.35 < kept[512:].mean() < 0.53


def test_labels_and_bad_dist_fail_before_any_work(tiny_config, tmp_path):
    specs = methods.parse("random,random:dist=erk,random:dist=uniform", tiny_config)
    assert [s.label for s in specs] == ["random", "random_erk", "random_uniform"]
    assert [methods.pretty(s.label) for s in specs] == [
        "Random pruning", "Random pruning (ERK)", "Random pruning (uniform)"]
    tiny_config.prune.method = "imp,random:dist=er"
    with pytest.raises(ValueError, match=r"prune.method: random: dist must be one of global, "
                                         r"erk, uniform, got 'er'"):
        experiment.run(tiny_config, str(tmp_path / "wd"))
    assert not (tmp_path / "wd").exists()
