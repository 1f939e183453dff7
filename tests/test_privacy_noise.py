import numpy as np
import pytest
import torch
from scipy import stats

from dptrain.privacy.noise import NoiseSource
from dptrain.privacy.randomness import Streams

SIGMA, CLIP, N = 0.8, 2.5, 20_000


@pytest.mark.parametrize("secure", [False, True])
def test_noise_is_standard_normal(secure):
    scale = SIGMA * CLIP
    noise = NoiseSource(seed=11, secure=secure)((N,), "cpu").double().numpy() * scale
    assert stats.kstest(noise, "norm", args=(0, scale)).pvalue > 1e-3
    # a source off by a factor 2/3 or 3/2 in scale is caught
    assert stats.kstest(noise * 2 / 3, "norm", args=(0, scale)).pvalue < 1e-6
    assert stats.kstest(noise * 3 / 2, "norm", args=(0, scale)).pvalue < 1e-6


@pytest.mark.parametrize("secure", [False, True])
def test_elements_are_uncorrelated(secure):
    x = NoiseSource(seed=1, secure=secure)((N,)).double().numpy()
    lag1 = np.corrcoef(x[:-1], x[1:])[0, 1]
    assert abs(lag1) < 4 / np.sqrt(N)


def test_seeded_source_is_reproducible_and_seed_dependent():
    a, b, c = NoiseSource(5), NoiseSource(5), NoiseSource(6)
    x = a((3, 4))
    assert torch.equal(x, b((3, 4)))
    assert not torch.equal(x, c((3, 4)))
    assert x.shape == (3, 4) and x.dtype == torch.float32


def test_dtype_does_not_change_the_stream():
    full = NoiseSource(5)((1000,))
    half = NoiseSource(5)((1000,), dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    assert torch.equal(half, full.to(torch.bfloat16))


def test_each_step_is_a_pure_function_of_the_key_and_step():
    """Resume needs no generator state: step t's noise is the same whoever asks, in any order."""
    first = NoiseSource(9)
    first.for_step(3)((100,))
    step = first.for_step(7)
    late = [step((50,)), step((7, 3))]
    fresh = NoiseSource(9).for_step(7)
    assert torch.equal(fresh((50,)), late[0]) and torch.equal(fresh((7, 3)), late[1])
    assert not torch.equal(NoiseSource(9).for_step(8)((50,)), late[0])
    assert not torch.equal(NoiseSource(9).for_step(7, rank=1)((50,)), late[0])
    # a continuation (next generation) under the same secret draws other noise
    assert not torch.equal(NoiseSource(Streams(9, generation=1)).for_step(7)((50,)), late[0])


def test_secure_source_is_not_replayable():
    a, b = NoiseSource(secure=True), NoiseSource(secure=True)
    x, y = a((1000,)), b((1000,))
    assert not torch.equal(x, y)
    assert a.streams is None  # nothing keyed, nothing to save or replay
    # outputs are drawn in float64: no two of 100k share a value (a coarse sampler would)
    z = a((100_000,), dtype=torch.float64).numpy()
    assert len(np.unique(z)) == len(z)
