"""Noise calibration for planning: many (sampling rate, steps) pairs at once.

The vectorised RDP calibration lives with the accountants (`dptrain.privacy.rdp`); this module adds
`confirm_pld`, which recalibrates a chosen plan with the tighter certified PLD accountant.
"""
from __future__ import annotations

from dptrain.privacy.accounting import calibrate_noise
from dptrain.privacy.rdp import ORDERS, calibrate_rdp, epsilon_rdp, rdp_poisson_gaussian

__all__ = ["ORDERS", "calibrate_rdp", "confirm_pld", "epsilon_rdp", "rdp_poisson_gaussian"]


def confirm_pld(epsilon: float, delta: float, q: float, steps: int) -> float:
    """sigma from the certified PLD accountant (tight; a few seconds). The search is bracketed
    between half the RDP sigma and the RDP sigma, which PLD never needs to exceed."""
    upper = float(calibrate_rdp(epsilon, delta, [q], [steps])[0])
    return float(calibrate_noise(epsilon, delta, q, int(steps), accountant="pld",
                                 min_sigma=upper / 2, max_sigma=upper * (1 + 1e-6)))
