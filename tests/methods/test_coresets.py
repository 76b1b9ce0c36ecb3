"""The coreset selection rules (dp_jax/data/coresets.py) against selections worked out by hand."""

import math

import numpy as np
import pytest

from dp_jax.data import coresets

NP = coresets.NOT_PRESENTED


def test_herding_brings_the_running_mean_closest_to_the_class_mean():
    # Mean 3.2. t=1: the 3. t=2: (3+f)/2 nearest 3.2 -> f nearest 3.4 among 0,1,2,10: the 2.
    # t=3: (5+f)/3 -> f nearest 4.6 among 0,1,10: 1 gives 2, 10 gives 5, 0 gives 1.67: the 1.
    # t=4: (6+f)/4 -> f nearest 6.8 among 0,10: the 10.
    f = np.array([[0.0], [1.0], [2.0], [3.0], [10.0]])
    np.testing.assert_array_equal(coresets.herding(f, 4), [3, 2, 1, 4])


def test_herding_in_two_dimensions_and_ties_go_to_the_lower_position():
    # Four corners of a square and their centre: the centre is the mean, then the running mean
    # (c + x)/2 is as close for every corner: the first corner; then its opposite restores it.
    f = np.array([[1.0, 1.0], [-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0], [0.0, 0.0]])
    np.testing.assert_array_equal(coresets.herding(f, 3), [4, 0, 1])


def test_kcenter_starts_at_the_mean_then_takes_the_farthest_point():
    # Mean 5: the 5 (position 2). Distances 5,4,0,4,5: tie -> position 0. Nearest-centre
    # distances then 0,1,0,4,5: position 4. Then 0,1,0,1,0: tie -> position 1.
    f = np.array([[0.0], [1.0], [5.0], [9.0], [10.0]])
    np.testing.assert_array_equal(coresets.kcenter(f, 4), [2, 0, 4, 1])


def test_kcenter_never_picks_a_row_twice_among_duplicates():
    np.testing.assert_array_equal(coresets.kcenter(np.ones((4, 3)), 3), [0, 1, 2])


def test_forgetting_events_follow_toneva():
    flags = np.array([
        # ex0 ex1 ex2 ex3 ex4 ex5 ex6
        [1, 1, 0, 0, 1, NP, 1],
        [0, 1, 0, 1, NP, NP, 0],
        [1, 1, 0, 0, 0, NP, NP],
        [0, 1, 0, 1, 1, NP, NP],
    ])
    # ex0 learned, forgotten, learned, forgotten: 2 events; ex4 forgets across its skipped
    # presentation; ex2 is never learned and ex5 never presented: both infinitely forgotten.
    np.testing.assert_array_equal(coresets.forgetting_counts(flags),
                                  [2, 0, math.inf, 1, 1, math.inf, 1])
    # Infinite first (ex2 with 4 misses before ex5 with none), then 2 events (ex0), then the
    # single events by misses: ex3 (2), then ex4 and ex6 (1 each) by position; ex1 last.
    np.testing.assert_array_equal(coresets.most_forgotten(flags, 7), [2, 5, 0, 3, 4, 6, 1])
    np.testing.assert_array_equal(coresets.most_forgotten(flags, 3), [2, 5, 0])


def test_el2n_is_the_mean_error_norm_over_networks():
    ln3 = math.log(3.0)
    logits = np.array([[[0.0, 0.0], [ln3, 0.0], [0.0, ln3]],    # net 1: p = .5/.5, .75/.25, .25/.75
                       [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])  # net 2: p = .5/.5 everywhere
    labels = np.array([0, 0, 0])
    # ||p - e0|| = sqrt(2)|1 - p0|: net 1 gives sqrt2 (.5, .25, .75), net 2 sqrt2 .5 each.
    want = math.sqrt(2) * np.array([0.5, (0.25 + 0.5) / 2, (0.75 + 0.5) / 2])
    np.testing.assert_allclose(coresets.el2n(logits, labels), want, rtol=1e-12)
    scores = coresets.el2n(logits, labels)
    np.testing.assert_array_equal(coresets.lowest(scores, 2), [1, 0])   # el2n_easy
    np.testing.assert_array_equal(coresets.highest(scores, 2), [2, 0])  # el2n_hard


def test_lowest_and_highest_break_ties_by_position():
    s = np.array([1.0, 0.0, 1.0, 0.0, 2.0])
    np.testing.assert_array_equal(coresets.lowest(s, 3), [1, 3, 0])
    np.testing.assert_array_equal(coresets.highest(s, 3), [4, 0, 2])


def test_per_class_takes_the_rule_s_picks_of_every_class_and_sorts_them():
    labels = np.array([0, 1, 0, 1, 0, 1, 2, 2])
    score = np.array([5.0, 1.0, 3.0, 2.0, 4.0, 0.0, 9.0, 8.0])
    got = coresets.per_class(labels, 2, 3, lambda idx, k: coresets.highest(score[idx], k))
    # class 0 (0, 2, 4): 5 and 4 -> 0, 4; class 1 (1, 3, 5): 2 and 1 -> 3, 1; class 2: both.
    np.testing.assert_array_equal(got, [0, 1, 3, 4, 6, 7])
    np.testing.assert_array_equal(np.bincount(labels[got]), [2, 2, 2])
    with pytest.raises(ValueError, match="class 2 has 2 training examples, fewer than the 3"):
        coresets.per_class(labels, 3, 3, lambda idx, k: np.arange(k))
