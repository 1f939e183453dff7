import math

import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings, strategies as st

from dptrain.audit.one_run import (best_epsilon_lower_bound, epsilon_from_counts, epsilon_lower_bound,
                                   max_certifiable_epsilon, p_value, roc_hull_cutoffs)
from dptrain.errors import UserError


def naive_p_value(m, r, v, eps, delta):
    """Straight from the paper's statement, with exact binomial sums in Python floats."""
    q = math.exp(eps) / (1 + math.exp(eps))
    pmf = [math.comb(r, j) * q ** j * (1 - q) ** (r - j) for j in range(r + 1)]
    tail = sum(pmf[v:])
    alpha = max((sum(pmf[v - j] for j in range(1, i + 1)) / i for i in range(1, v + 1)), default=0.0)
    return min(tail + 2 * m * delta * alpha, 1.0)


@settings(max_examples=200, deadline=None)
@given(r=st.integers(1, 60), data=st.data(), eps=st.floats(0, 4), delta=st.sampled_from([0, 1e-6, 1e-3, 0.1]))
def test_p_value_matches_naive_reference(r, data, eps, delta):
    v = data.draw(st.integers(0, r))
    m = data.draw(st.integers(r, 200))
    assert p_value(m, r, v, eps, delta) == pytest.approx(naive_p_value(m, r, v, eps, delta), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("m,r,v,delta", [(1000, 100, 90, 0.0), (1000, 100, 90, 1e-5), (20000, 3000, 2500, 1e-6)])
def test_epsilon_from_counts_is_the_largest_rejected_epsilon(m, r, v, delta):
    eps = epsilon_from_counts(m, r, v, delta, 0.05)
    assert eps > 0
    assert p_value(m, r, v, eps - 1e-4, delta) < 0.05 < p_value(m, r, v, eps + 1e-4, delta)


def gaussian_quantile_scores(shift, n=10000):
    out = scipy.stats.norm.ppf(np.linspace(0, 1, n, endpoint=False) + 1 / (2 * n))
    return np.r_[out + shift, out], np.r_[np.ones(n, bool), np.zeros(n, bool)]


@pytest.mark.parametrize("shift,expected", [(0, 0.0), (1, 1.13346), (2, 2.311945), (4, 4.395568)])
def test_reproduces_jax_privacy_reference_values(shift, expected):
    # jax_privacy's auditing test: 10,000 held-in scores N(shift, 1) and 10,000 held-out N(0, 1)
    # laid out deterministically at the normal quantiles, significance 0.05, delta 1e-6, one-sided
    # thresholds on the ROC hull with a Bonferroni correction over the hull's vertices.
    scores, included = gaussian_quantile_scores(shift)
    result = best_epsilon_lower_bound(scores, included, delta=1e-6, significance=0.05)
    assert result.epsilon == pytest.approx(expected, abs=1e-4)
    assert result.k_neg == 0 and result.num_canaries == 20000


def test_guess_counting_on_a_hand_example():
    scores = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    included = [1, 1, 1, 0, 1, 1, 0, 0, 0, 0]
    r = epsilon_lower_bound(scores, included, k_pos=3, k_neg=4)
    assert (r.num_guesses, r.num_correct) == (7, 7)
    r = epsilon_lower_bound(scores, included, k_pos=5, k_neg=0)
    assert (r.num_guesses, r.num_correct) == (5, 4)
    r = epsilon_lower_bound(scores, included, k_pos=0, k_neg=6)
    assert (r.num_guesses, r.num_correct) == (6, 4)
    # 7 of 7 right with delta 0: p = q^7, so the bound is logit(0.05 ** (1/7)) whatever m is.
    q = 0.05 ** (1 / 7)
    assert epsilon_lower_bound(scores, included, 3, 4).epsilon == pytest.approx(math.log(q / (1 - q)), abs=1e-6)
    # 4 of 4 cannot reject even eps = 0 at 0.05 (0.5^4 > 0.05).
    assert epsilon_lower_bound(scores, included, 2, 2).epsilon == 0.0


def brute_force_hull(fp, tp):
    pts = sorted(set(zip(fp, tp)))
    keep = [(0, 0)]  # "guess nothing" always starts the hull
    for p in pts[1:]:
        below = False
        for a in pts:
            for b in pts:
                if a[0] <= p[0] <= b[0] and a != p and b != p and a[0] < b[0]:
                    chord = a[1] + (b[1] - a[1]) * (p[0] - a[0]) / (b[0] - a[0])
                    if p[1] <= chord + 1e-12:
                        below = True
        same_x_higher = any(o[0] == p[0] and o[1] > p[1] for o in pts)
        if not below and not same_x_higher:
            keep.append(p)
    return keep


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.booleans()), min_size=1, max_size=25))
def test_roc_hull_matches_brute_force(pairs):
    scores = np.array([float(s) for s, _ in pairs])
    included = np.array([i for _, i in pairs])
    thresholds = np.unique(scores)
    fp = [0] + [int(((scores >= t) & ~included).sum()) for t in thresholds]
    tp = [0] + [int(((scores >= t) & included).sum()) for t in thresholds]
    expected = brute_force_hull(fp, tp)
    got = [(g - c, c) for g, c in roc_hull_cutoffs(scores, included)]
    assert got == expected


def test_no_signal_gives_zero_most_of_the_time():
    rng = np.random.default_rng(0)
    positives = 0
    trials = 200
    for _ in range(trials):
        scores = rng.normal(size=500)
        included = rng.integers(0, 2, 500).astype(bool)
        positives += best_epsilon_lower_bound(scores, included, delta=1e-5).epsilon > 0
    # A valid bound at significance 0.05 is positive in at most ~5% of null runs.
    assert positives / trials <= 0.08


def randomized_response_scores(eps, m, rng):
    """The score is the inclusion bit told truthfully with prob e^eps / (1 + e^eps): exactly eps-DP."""
    included = rng.integers(0, 2, m).astype(bool)
    truthful = rng.random(m) < math.exp(eps) / (1 + math.exp(eps))
    reported = np.where(truthful, included, ~included)
    return reported + 0.01 * rng.random(m), included  # tiny jitter: ties broken independently of coins


def test_bound_is_valid_and_nearly_tight_on_an_eps_dp_mechanism():
    rng = np.random.default_rng(1)
    eps_true, m = 2.0, 4000
    bounds = []
    for _ in range(40):
        scores, included = randomized_response_scores(eps_true, m, rng)
        # Guess every canary: the top half in, the bottom half out (fixed in advance of the coins).
        bounds.append(epsilon_lower_bound(scores, included, m // 2, m // 2, delta=0).epsilon)
    bounds = np.array(bounds)
    assert np.mean(bounds > eps_true) <= 0.1  # at most ~5% of runs may overshoot
    assert np.median(bounds) > 1.6            # and with 4000 canaries the bound gets close


def test_bound_never_exceeds_what_m_canaries_can_certify():
    rng = np.random.default_rng(2)
    m = 1000
    included = rng.integers(0, 2, m).astype(bool)
    scores = included + 0.0  # perfect separation
    n_in = int(included.sum())
    ceiling = max_certifiable_epsilon(m, 0.05)
    assert 5.5 < ceiling < 6.5
    perfect = epsilon_lower_bound(scores, included, n_in, m - n_in, delta=0)
    assert perfect.num_correct == m
    assert perfect.epsilon == pytest.approx(ceiling, abs=1e-6) and perfect.ceiling == ceiling
    assert epsilon_lower_bound(scores, included, n_in, m - n_in, delta=1e-5).epsilon < ceiling
    for k in [(10, 0), (n_in, 0), (100, 100), (0, m - n_in)]:
        assert epsilon_lower_bound(scores, included, *k).epsilon <= ceiling + 1e-9
    assert best_epsilon_lower_bound(scores, included).epsilon <= ceiling + 1e-9


def test_fixed_grid_applies_bonferroni():
    scores, included = gaussian_quantile_scores(2, n=2000)
    single = epsilon_lower_bound(scores, included, 800, 0, delta=1e-6)
    grid = best_epsilon_lower_bound(scores, included, delta=1e-6, k_grid=[200, 400, 800, 1600])
    assert grid.num_hypotheses == 4
    assert grid.epsilon >= epsilon_from_counts(4000, single.num_guesses, single.num_correct, 1e-6, 0.05 / 4)
    assert grid.epsilon < max(epsilon_lower_bound(scores, included, k, 0, delta=1e-6).epsilon
                              for k in [200, 400, 800, 1600])
    two_sided = best_epsilon_lower_bound(scores, included, delta=1e-6, k_grid=[(800, 800)])
    assert two_sided.num_guesses == 1600 and two_sided.k_neg == 800
    assert set(grid.to_dict()) >= {"epsilon", "num_canaries", "num_guesses", "num_correct", "significance"}


@pytest.mark.parametrize("kwargs,match", [
    (dict(scores=[1, 2], included=[True]), "inclusion flags"),
    (dict(scores=[1, float("nan")], included=[True, False]), "finite"),
    (dict(scores=[1, 2], included=[True, False], k_pos=3), "k_pos"),
    (dict(scores=[1, 2], included=[True, False], significance=0.5), "significance"),
    (dict(scores=[1, 2], included=[True, False], delta=-1), "delta"),
    (dict(scores=[1, 2], included=[2, 0]), "booleans"),
])
def test_bad_input_raises_user_error(kwargs, match):
    kwargs.setdefault("k_pos", 1)
    with pytest.raises(UserError, match=match):
        epsilon_lower_bound(**kwargs)
