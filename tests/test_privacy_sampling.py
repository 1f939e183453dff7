import inspect
import json

import numpy as np
import pytest
from scipy import stats

from dptrain.errors import UserError
from dptrain.privacy import sampling
from dptrain.privacy.sampling import PoissonSampler, shard

N, B, DRAWS = 40, 8, 4000  # q = 0.2
# The secure sampler is not reproducible, so every statistical check runs afresh: each keeps its
# false-alarm rate near 1e-4.
ALPHA = 1e-4


def make(num, batch, secure, **kw):
    """A keyed sampler (seed 7) or a secure one (OS CSPRNG)."""
    return PoissonSampler(num, batch, None if secure else 7, secure=secure, **kw)


@pytest.fixture(scope="module", params=[False, True], ids=["keyed", "secure"])
def membership(request) -> np.ndarray:
    """DRAWS x N indicator matrix of batch membership, keyed and secure samplers alike."""
    sampler = make(N, B, request.param)
    rows = np.zeros((DRAWS, N), dtype=bool)
    for i in range(DRAWS):
        batch = sampler.sample()
        assert batch.dtype == np.int64 and np.all(np.diff(batch) > 0)  # sorted, distinct
        rows[i, batch] = True
    return rows


def test_inclusion_frequency_is_q(membership):
    q = B / N
    for count in membership.sum(axis=0):
        # per-example two-sided binomial test, Bonferroni over the N examples
        assert stats.binomtest(int(count), DRAWS, q).pvalue > ALPHA / N


def test_pairwise_independence(membership):
    q = B / N
    x = membership.astype(float)
    joint = x.T @ x / DRAWS
    i, j = np.triu_indices(N, 1)
    # under independence each pair's joint frequency has mean q^2, sd sqrt(q^2 (1 - q^2) / DRAWS)
    z = (joint[i, j] - q * q) / np.sqrt(q * q * (1 - q * q) / DRAWS)
    assert np.abs(z).max() < 5.3  # ~780 pairs: P(max |z| > 5.3) < 1e-4 under independence
    assert abs(z.mean()) < 4.5 / np.sqrt(len(z)) * 3


def test_batch_size_distribution_is_binomial(membership):
    sizes = membership.sum(axis=1)
    ks = np.arange(N + 1)
    expected = stats.binom.pmf(ks, N, B / N) * DRAWS
    observed = np.bincount(sizes, minlength=N + 1)
    keep = expected >= 5  # merge the thin tails into one bin each side
    lo, hi = np.argmax(keep), len(keep) - np.argmax(keep[::-1]) - 1
    exp_bins = np.r_[expected[:lo + 1].sum(), expected[lo + 1:hi], expected[hi:].sum()]
    obs_bins = np.r_[observed[:lo + 1].sum(), observed[lo + 1:hi], observed[hi:].sum()]
    assert stats.chisquare(obs_bins, exp_bins * obs_bins.sum() / exp_bins.sum()).pvalue > ALPHA


def test_huge_dataset_is_cheap_and_unbiased():
    sampler = PoissonSampler(10**10, 500, seed=1)
    sizes = [len(sampler.sample()) for _ in range(200)]
    batch = sampler.sample()
    assert batch.max() < 10**10 and len(np.unique(batch)) == len(batch)
    # mean of 200 Poisson(500)-like sizes: sd of the mean is about 1.6
    assert abs(np.mean(sizes) - 500) < 8


def test_seed_determinism_and_exact_resume():
    a, b = PoissonSampler(1000, 50, seed=3), PoissonSampler(1000, 50, seed=3)
    for _ in range(5):
        assert np.array_equal(a.sample(), b.sample())
    other = PoissonSampler(1000, 50, seed=4)
    assert not all([np.array_equal(a.sample(), other.sample()) for _ in range(3)])

    state = json.loads(json.dumps(a.state_dict()))  # JSON-able, and holds no randomness
    assert set(state) == {"num_examples", "expected_batch_size", "max_batch_size", "secure", "steps_taken",
                          "truncated_steps"}
    expected = [a.sample() for _ in range(5)]
    resumed = PoissonSampler(1000, 50, seed=3)
    resumed.load_state_dict(state)
    assert all(np.array_equal(x, resumed.sample()) for x in expected)
    assert resumed.steps_taken == a.steps_taken == 13
    assert np.array_equal(PoissonSampler(1000, 50, seed=3).batch_at(10)[0], expected[2])  # step 10

    with pytest.raises(UserError, match="resuming would change q"):
        PoissonSampler(1000, 60, seed=3).load_state_dict(state)


def test_truncation_is_counted_and_bounded():
    sampler = PoissonSampler(100, 50, seed=0, max_batch_size=50)
    sizes = [len(sampler.sample()) for _ in range(400)]
    assert max(sizes) == 50
    # P(Binomial(100, 0.5) > 50) = 0.46
    assert sampler.truncated_steps == pytest.approx(0.46 * 400, abs=40)
    assert sampler.steps_taken == 400


@pytest.mark.parametrize("secure", [False, True])
def test_truncated_batches_are_uniform_subsets(secure):
    sampler = make(20, 18, secure, max_batch_size=10)
    counts = np.zeros(20)
    for _ in range(3000):
        counts[sampler.sample()] += 1
    assert sampler.truncated_steps == 3000
    assert stats.chisquare(counts).pvalue > ALPHA  # every example equally likely to survive


def test_empty_batch_is_a_valid_draw():
    sampler = PoissonSampler(1000, 0.001, seed=0)
    batches = [sampler.sample() for _ in range(50)]
    assert any(len(b) == 0 for b in batches) and sampler.steps_taken == 50


def test_shard_splits_the_global_batch():
    batch = PoissonSampler(10_000, 1000, seed=2).sample()
    parts = [shard(batch, r, 3) for r in range(3)]
    assert np.array_equal(np.concatenate(parts), batch)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError):
        shard(batch, 3, 3)


@pytest.mark.parametrize("args", [(0, 1), (10, 11), (10, 0), (10, -1), (10.5, 2)])
def test_rejects_bad_sizes(args):
    with pytest.raises(UserError):
        PoissonSampler(*args, seed=0)


def test_no_shuffle_based_sampling():
    source = inspect.getsource(sampling)
    for banned in (".shuffle(", ".permutation(", "randperm"):
        assert banned not in source


def test_rejects_negative_seed():
    with pytest.raises(UserError):
        PoissonSampler(10, 2, seed=-1)


def test_secure_batches_cannot_be_replayed():
    """Two secure samplers built alike draw different batches; nothing of theirs can be saved to replay."""
    a, b = make(10_000, 100, True), make(10_000, 100, True)
    assert not any(np.array_equal(a.sample(), b.sample()) for _ in range(3))
    assert a.streams is None and "rng" not in a.state_dict()


def test_secure_batch_size_of_a_huge_dataset_is_binomial():
    sampler = make(10**10, 500, True)
    sizes = [len(sampler.sample()) for _ in range(100)]
    assert abs(np.mean(sizes) - 500) < 4 * np.sqrt(500 / 100)
