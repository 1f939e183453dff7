"""The planner's vectorised RDP calibration against dp_accounting's RDP accountant (independent)."""
import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant

from dptrain.scaling.noise import calibrate_rdp, confirm_pld, epsilon_rdp


def reference_epsilon(sigma, q, steps, delta):
    accountant = rdp_privacy_accountant.RdpAccountant()  # default orders include fractional ones
    accountant.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps))
    return accountant.get_epsilon(delta)


CASES = [(1.5, 0.04, 2250, 1e-5), (1.0, 0.01, 10000, 1e-10), (0.8, 0.001, 100, 1e-6),
         (3.0, 0.5, 500, 1e-8), (0.614, 5.3e-5, 100000, 1.1e-10), (20.0, 1.0, 1000, 1e-6)]


@pytest.mark.parametrize("sigma, q, steps, delta", CASES)
def test_epsilon_matches_dp_accounting_rdp(sigma, q, steps, delta):
    ours = epsilon_rdp([sigma], [q], [steps], delta)[0]
    ref = reference_epsilon(sigma, q, steps, delta)
    # integer orders only: never below the reference (still an upper bound), and close to it
    assert ref * (1 - 1e-6) <= ours <= ref * 1.03


def test_published_reference_value():
    # Opacus RDP test value for (sigma 1.5, q 0.04, 2250 steps, delta 1e-5)
    assert epsilon_rdp([1.5], [0.04], [2250], 1e-5)[0] == pytest.approx(7.32911117143, rel=1e-3)


def test_calibration_is_tight_and_vectorised():
    q = np.array([1e-4, 1e-3, 0.01, 0.1, 1.0])
    steps = np.array([100000, 10000, 1000, 100, 10])
    sigma = calibrate_rdp(2.0, 1e-8, q, steps)
    assert (epsilon_rdp(sigma, q, steps, 1e-8) <= 2.0).all()
    assert (epsilon_rdp(sigma * 0.999, q, steps, 1e-8) > 2.0).all()
    for s, qi, t in zip(sigma, q, steps):  # the independent accountant agrees it meets the budget
        assert reference_epsilon(s, qi, int(t), 1e-8) <= 2.0 + 1e-9


def test_noise_grows_with_steps_and_tighter_budget():
    sigma = calibrate_rdp(1.0, 1e-8, [0.01] * 3, [100, 1000, 10000])
    assert np.all(np.diff(sigma) > 0)
    assert calibrate_rdp(0.5, 1e-8, [0.01], [1000])[0] > sigma[1]


def test_pld_confirmation_is_tighter_than_rdp():
    rdp = calibrate_rdp(2.0, 1e-6, [0.1], [20])[0]
    pld = confirm_pld(2.0, 1e-6, 0.1, 20)
    assert 0.8 * rdp < pld < rdp
