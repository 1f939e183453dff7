"""A fast upper bound on the ε spent so far, for the per-step log (the report keeps the exact one).

Untruncated Poisson: Rényi DP over Opacus's orders, each distinct step's RDP computed once and
scaled by its count, so a step costs microseconds; it equals Opacus's RDP accountant and is
never below PLD. Truncated Poisson (which RDP cannot account): PLD on a coarse 1e-2 grid, which
rounds privacy loss up, so it stays an upper bound (tens of milliseconds a step).
"""
from __future__ import annotations

import warnings
from functools import lru_cache
from typing import Iterable

import numpy as np

from dptrain.privacy.accounting import StepRun

COARSE_PLD_GRID = 1e-2


def running_epsilon(runs: Iterable[StepRun], delta: float) -> float:
    runs = [r for r in runs if r.count > 0 and r.sampling_rate > 0]
    if not runs:
        return 0.0
    if any(r.noise_multiplier == 0 for r in runs):
        return float("inf")
    if any(r.truncated for r in runs):
        return _coarse_pld(tuple(runs), delta)
    from opacus.accountants.analysis.rdp import get_privacy_spent
    from opacus.accountants.rdp import RDPAccountant

    rdp = sum(r.count * _step_rdp(r.noise_multiplier, r.sampling_rate) for r in runs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns about its alpha grid; the bound stays valid
        eps, _ = get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return max(0.0, float(eps))


@lru_cache(maxsize=64)
def _step_rdp(noise_multiplier: float, sampling_rate: float) -> np.ndarray:
    from opacus.accountants.analysis.rdp import compute_rdp
    from opacus.accountants.rdp import RDPAccountant

    return np.asarray(compute_rdp(q=sampling_rate, noise_multiplier=noise_multiplier, steps=1,
                                  orders=RDPAccountant.DEFAULT_ALPHAS))


def _coarse_pld(runs: tuple[StepRun, ...], delta: float) -> float:
    import dp_accounting
    from dp_accounting.pld.pld_privacy_accountant import PLDAccountant

    acc = PLDAccountant(value_discretization_interval=COARSE_PLD_GRID)
    for r in runs:
        if r.truncated:
            event = dp_accounting.TruncatedSubsampledGaussianDpEvent(
                dataset_size=r.dataset_size, sampling_probability=r.sampling_rate,
                truncated_batch_size=r.max_batch_size, noise_multiplier=r.noise_multiplier)
        else:
            event = dp_accounting.PoissonSampledDpEvent(
                r.sampling_rate, dp_accounting.GaussianDpEvent(r.noise_multiplier))
        acc.compose(event, r.count)
    return max(0.0, float(acc.get_epsilon(delta)))
