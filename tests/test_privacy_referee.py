"""Every epsilon the product reports, checked against the referee's bracket.

The referee (`dptrain.privacy.certified.epsilon_bracket`, at least twice the product's grid)
bounds the exact epsilon of the Poisson-subsampled Gaussian from both sides: its upper end by
the same connect-the-dots construction as the product, its lower end by an independent one
(quantized output, rounding errors given back with a Bernstein bound). The reported epsilon must
never be below the lower end, and must be within 1% of the upper end wherever the bracket is
narrower than 0.5%.
"""
import math

import numpy as np
import pytest
from scipy.stats import binom

from dptrain.privacy.accounting import TRUNCATION_SHARE, PrivacyLedger, epsilon
from dptrain.privacy.certified import (composed_lower, composed_upper, epsilon_bracket,
                                       epsilon_lower)

REFEREE_GRID = 2 ** 17

VAULTGEMMA = [(0.614, 5.3956e-5, 100_000, 1.1e-10), (0.614, 5.3e-5, 100_000, 1.1e-10)]
# Every sigma with every (q, steps), at one of the two deltas in turn (each delta meets every sigma
# and every (q, steps)): a referee bracket costs about a second.
GRID = VAULTGEMMA + [
    (sigma, q, steps, (1e-5, 1e-10)[(i + j) % 2])
    for i, sigma in enumerate((0.6, 0.8, 1.0, 1.5, 3.0))
    for j, (q, steps) in enumerate(((1e-5, 10_000_000), (5.3e-5, 100_000), (1e-3, 10_000), (0.01, 1000),
                                    (0.2, 10)))
]


@pytest.mark.slow
@pytest.mark.parametrize("sigma,q,steps,delta", GRID)
def test_reported_epsilon_against_referee(sigma, q, steps, delta):
    bracket = epsilon_bracket(sigma, q, steps, delta, grid=REFEREE_GRID)
    assert 0 <= bracket.lower <= bracket.upper
    reported = epsilon(sigma, q, steps, delta)
    assert reported >= bracket.lower
    if bracket.width < 0.005:
        assert reported <= bracket.upper * 1.01
    assert epsilon(sigma, q, steps, delta, "rdp") >= bracket.lower  # the other upper bound


def _inclusion_rate(q: float, dataset_size: int, cap: int) -> float:
    """A lower bound on the chance that an example lands in a truncated batch: q times the
    chance it survives the cut, with (at least) dataset_size others drawn alongside it."""
    mean, sd = dataset_size * q, math.sqrt(dataset_size * q * (1 - q))
    k = np.arange(max(cap, 0), int(mean + 60 * sd + 60))
    survive = binom.cdf(cap - 1, dataset_size, q) + np.sum(binom.pmf(k, dataset_size, q)
                                                           * cap / (1 + k))
    return q * min(float(survive), 1.0)


def _caps(q, dataset_size, deviations):
    mean, sd = dataset_size * q, math.sqrt(dataset_size * q * (1 - q))
    return [int(mean + d * sd) for d in deviations]


@pytest.mark.parametrize("sigma,q,steps,delta,dataset_size,deviations", [
    (2.0, 0.01, 100, 1e-6, 10_000, (2, 5, 8, 12, 20, 40)),
    (0.614, 5.3e-5, 100_000, 1.1e-10, 9_770_000_000, (9, 12, 20, 40)),
])
def test_truncated_epsilon_against_referee(sigma, q, steps, delta, dataset_size, deviations):
    caps = _caps(q, dataset_size, deviations)
    reported = [epsilon(sigma, q, steps, delta, dataset_size=dataset_size, max_batch_size=cap)
                for cap in caps]
    # A dataset whose other gradients are zero makes the truncated mechanism a plain
    # subsampled Gaussian at the inclusion rate: its epsilon is a lower bound.
    for cap, eps in zip(caps, reported):
        assert eps >= epsilon_lower(sigma, _inclusion_rate(q, dataset_size, cap), steps, delta,
                                    grid=REFEREE_GRID)
    # past the point where truncation is negligible, the cap no longer changes the bound
    plain = epsilon(sigma, q, steps, delta * (1 - TRUNCATION_SHARE))
    p_step = [binom.sf(cap, dataset_size + 1, q) for cap in caps]
    negligible = [eps for eps, p in zip(reported, p_step)
                  if (1 + math.exp(eps)) * steps * p <= TRUNCATION_SHARE * delta]
    assert negligible and all(eps == plain for eps in negligible)
    # and raising the cap never raises epsilon once the coupling bound applies
    coupled = [eps for eps, p in zip(reported, p_step) if (1 + math.exp(eps)) * steps * p < delta]
    assert coupled == sorted(coupled, reverse=True)


def test_mixed_ledger_against_referee():
    # a run resumed with other settings: the referee composes the two runs exactly
    runs = [(1.0, 0.01, 3000), (0.7, 0.02, 500)]
    ledger = PrivacyLedger()
    for sigma, q, count in runs:
        ledger.record(sigma, q, count=count)
    lower = composed_lower(runs, 1e-8, grid=REFEREE_GRID)
    upper = composed_upper(runs, 1e-8, grid=REFEREE_GRID)
    reported = ledger.epsilon(1e-8)
    assert lower <= reported <= upper * 1.01
    assert (upper - lower) / upper < 0.005
