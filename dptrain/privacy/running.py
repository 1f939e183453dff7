"""A fast upper bound on the ε spent so far, for the per-step log (the report keeps the exact one).

dp_accounting's PLD on a coarse 1e-2 grid. Its pessimistic discretization rounds privacy loss up,
so the value never falls below the exact one, and it stays close (about 0.002 over at the demo's
100 steps), unlike RDP, which there reads 9.8 for an exact 8.0. It costs tens of milliseconds a
step on CPU, the same for truncated Poisson sampling, which RDP cannot account at all.
"""
from __future__ import annotations

from typing import Iterable

from dptrain.privacy.accounting import StepRun

COARSE_PLD_GRID = 1e-2


def running_epsilon(runs: Iterable[StepRun], delta: float) -> float:
    import dp_accounting
    from dp_accounting.pld.pld_privacy_accountant import PLDAccountant

    runs = [r for r in runs if r.count > 0 and r.sampling_rate > 0]
    if not runs:
        return 0.0
    if any(r.noise_multiplier == 0 for r in runs):
        return float("inf")
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
