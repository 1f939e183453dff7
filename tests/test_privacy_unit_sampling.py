"""Sampling by privacy unit: Poisson over units at q, then a fresh uniform k-subset of each
sampled unit's sequences; checked statistically, keyed and secure alike."""
import itertools

import numpy as np
import pytest
from scipy import stats

from dptrain.errors import UserError
from dptrain.privacy.sampling import UnitSampler

COUNTS = np.array([1, 2, 4, 6, 3, 1, 4, 2, 5, 4, 1, 3])  # sequences per unit
STARTS = np.concatenate(([0], np.cumsum(COUNTS)[:-1]))
K, EXPECTED_UNITS, DRAWS = 2, 4, 3000  # q = 1/3
ALPHA = 1e-4  # each statistical check's false-alarm rate (the secure draws are fresh every run)


def make(secure: bool, **kw) -> UnitSampler:
    return UnitSampler(STARTS, COUNTS, EXPECTED_UNITS, K, None if secure else 7, secure=secure, **kw)


@pytest.fixture(scope="module", params=[False, True], ids=["keyed", "secure"])
def draws(request) -> list[np.ndarray]:
    sampler = make(request.param)
    return [sampler.sample() for _ in range(DRAWS)]


def owner(seq: int) -> int:
    return int(np.searchsorted(STARTS, seq, side="right")) - 1


def by_unit(draws) -> list[dict[int, tuple]]:
    """Per step: {unit: its chosen sequences}, checking the layout on the way."""
    out = []
    for rows in draws:
        assert rows.dtype == np.int64 and rows.shape[1] == K
        step = {}
        for row in rows:
            real = row[row >= 0]
            assert (row[len(real):] == -1).all() and np.all(np.diff(real) > 0)  # sorted, then padding
            units = {owner(s) for s in real}
            assert len(units) == 1  # one row holds one unit's sequences only
            u = units.pop()
            assert u not in step and len(real) == min(K, COUNTS[u])  # all of a small unit, else k
            step[u] = tuple(real - STARTS[u])
        assert list(step) == sorted(step)
        out.append(step)
    return out


def test_units_join_independently_with_probability_q(draws):
    steps = by_unit(draws)
    q = EXPECTED_UNITS / len(COUNTS)
    member = np.array([[u in s for u in range(len(COUNTS))] for s in steps], dtype=float)
    for count in member.sum(axis=0):
        assert stats.binomtest(int(count), DRAWS, q).pvalue > ALPHA / len(COUNTS)
    sizes = member.sum(axis=1).astype(int)
    # the number of units per step is Binomial(units, q): chi-square on the well-filled bins
    expected = stats.binom.pmf(np.arange(len(COUNTS) + 1), len(COUNTS), q) * DRAWS
    observed = np.bincount(sizes, minlength=len(COUNTS) + 1)
    keep = expected >= 5
    obs = np.r_[observed[keep], observed[~keep].sum()]
    exp = np.r_[expected[keep], expected[~keep].sum()]
    assert stats.chisquare(obs, exp).pvalue > ALPHA


@pytest.mark.parametrize("unit", [2, 3])  # 4 and 6 sequences: 6 and 15 possible 2-subsets
def test_a_units_sequences_are_a_fresh_uniform_subset_each_time(draws, unit):
    chosen = [s[unit] for s in by_unit(draws) if unit in s]
    subsets = list(itertools.combinations(range(COUNTS[unit]), K))
    counts = np.array([chosen.count(c) for c in subsets])
    assert counts.sum() == len(chosen)
    assert stats.chisquare(counts).pvalue > ALPHA  # uniform over the k-subsets
    # afresh: consecutive draws of the same unit are independent (chi-square on the pair table)
    index = {c: i for i, c in enumerate(subsets)}
    table = np.zeros((len(subsets), len(subsets)))
    for a, b in zip(chosen, chosen[1:]):
        table[index[a], index[b]] += 1
    assert stats.chi2_contingency(table).pvalue > ALPHA


def test_keyed_draws_replay_and_resume():
    a, b = make(False), make(False)
    assert all(np.array_equal(a.sample(), b.sample()) for _ in range(20))
    resumed = make(False)
    resumed.load_state_dict(a.state_dict())
    assert resumed.steps_taken == 20 and np.array_equal(resumed.sample(), a.rows_at(20))
    assert a.sampling_rate == EXPECTED_UNITS / len(COUNTS) and a.num_units == len(COUNTS)
    other = UnitSampler(STARTS, COUNTS, EXPECTED_UNITS, K + 1, 7)
    with pytest.raises(UserError, match="saved for"):
        other.load_state_dict(a.state_dict())


def test_secure_draws_are_not_replayed():
    sampler = make(True)
    draws = [sampler.rows_at(0) for _ in range(30)]
    assert len({r.tobytes() for r in draws}) > 1


@pytest.mark.parametrize("starts,counts,expected,k,message", [
    ([0, 1], [1, 0], 1, 1, "at least one sequence"),
    ([0], [1, 2], 1, 1, "at least one sequence"),
    ([0, 1], [1, 2], 1, 0, "positive integer"),
    ([0, 1], [1, 2], 3, 1, "expected batch size"),
])
def test_bad_input(starts, counts, expected, k, message):
    with pytest.raises(UserError, match=message):
        UnitSampler(starts, counts, expected, k, 0)
