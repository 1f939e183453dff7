"""Planner noise calibration: vectorised RDP grid vs one dp_accounting RDP calibration per pair.

Prints seconds per (q, steps) pair for both on the same pairs, their ratio, and the largest
relative sigma difference. Run from the repository root: `python benchmarks/scaling_calibration.py`.
"""
import time

import dp_accounting
import numpy as np
from absl import logging
from dp_accounting.rdp import rdp_privacy_accountant

from dptrain.scaling.noise import calibrate_rdp

logging.set_verbosity(logging.ERROR)  # dp_accounting's order-by-order numerical notes
EPSILON, DELTA = 2.0, 1e-8
rng = np.random.default_rng(0)
q = 10 ** rng.uniform(-5, 0, 12)
steps = np.round(10 ** rng.uniform(1, 6, 12)).astype(int)


def reference(qi: float, ti: int) -> float:
    def event(sigma):
        return dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(qi, dp_accounting.GaussianDpEvent(sigma)), int(ti))
    return dp_accounting.calibrate_dp_mechanism(
        rdp_privacy_accountant.RdpAccountant, event, EPSILON, DELTA,
        dp_accounting.ExplicitBracketInterval(1e-3, 1e5), tol=1e-6)


start = time.perf_counter()
ref = np.array([reference(a, b) for a, b in zip(q, steps)])
t_ref = (time.perf_counter() - start) / len(q)

big_q = np.repeat(q, 50)  # a planner-sized batch: 600 pairs
big_t = np.repeat(steps, 50)
start = time.perf_counter()
ours = calibrate_rdp(EPSILON, DELTA, big_q, big_t)[::50]
t_ours = (time.perf_counter() - start) / len(big_q)

print(f"dp_accounting RDP, one pair at a time: {t_ref * 1e3:8.1f} ms/pair")
print(f"vectorised integer-order RDP grid:     {t_ours * 1e3:8.2f} ms/pair")
print(f"speed-up: {t_ref / t_ours:.0f}x; sigma relative difference: max "
      f"{np.max(np.abs(ours / ref - 1)):.2%} (ours >= reference: {bool(np.all(ours >= ref * (1 - 1e-6)))})")
