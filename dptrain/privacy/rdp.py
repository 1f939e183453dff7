"""Renyi DP of the Poisson-subsampled Gaussian at integer orders, vectorised over many plans.

RDP at integer orders (Mironov, Talwar, Zhang 2019, exact there), converted to (eps, delta) with the
conversion of Balle et al. 2020 (as in dp_accounting and Opacus), and a bisection on log sigma for
many (sampling rate, steps) pairs at once. RDP over-states eps compared with PLD, so a sigma found
here is valid (slightly larger than needed). Used by the accountant (the "rdp" bound and the first
guess of every calibration) and by the planner, which calibrates hundreds of plans together.
"""
from __future__ import annotations

import numpy as np
from scipy.special import gammaln, logsumexp

# Orders up to 256: eps targets down to about 0.07 at delta = 1e-10 are reachable.
ORDERS = np.array(list(range(2, 33)) + [40, 48, 56, 64, 80, 96, 128, 192, 256])


def rdp_poisson_gaussian(q: np.ndarray, sigma: np.ndarray, orders=ORDERS) -> np.ndarray:
    """RDP (per step) at each integer order, shape (len(q), len(orders))."""
    q = np.asarray(q, dtype=float)[:, None]
    sigma = np.asarray(sigma, dtype=float)[:, None]
    with np.errstate(divide="ignore"):
        log_q, log_1mq = np.log(q), np.log1p(-q)
    log_1mq = np.maximum(log_1mq, -1e300)  # q = 1: a huge finite value keeps 0 * log(1-q) at 0
    out = np.empty((q.shape[0], len(orders)))
    for j, a in enumerate(orders):
        i = np.arange(a + 1)[None, :]
        log_binom = gammaln(a + 1) - gammaln(i + 1) - gammaln(a - i + 1)
        terms = log_binom + i * np.maximum(log_q, -1e300) + (a - i) * log_1mq + (i * i - i) / (2 * sigma**2)
        out[:, j] = logsumexp(terms, axis=1) / (a - 1)
    return out


def epsilon_rdp(sigma, q, steps, delta: float, orders=ORDERS) -> np.ndarray:
    """eps of `steps` Poisson-subsampled Gaussian steps at each (sigma, q, steps)."""
    rdp = np.asarray(steps, dtype=float)[:, None] * rdp_poisson_gaussian(q, sigma, orders)
    a = orders[None, :].astype(float)
    eps = rdp + np.log1p(-1 / a) - (np.log(delta) + np.log(a)) / (a - 1)
    return np.maximum(eps.min(axis=1), 0.0)


def calibrate_rdp(epsilon: float, delta: float, q, steps, lo: float = 1e-3, hi: float = 1e6,
                  iters: int = 32) -> np.ndarray:
    """Smallest sigma (to ~1e-6 relative) with eps_RDP <= epsilon, for every (q, steps) pair."""
    q = np.asarray(q, dtype=float).ravel()
    steps = np.asarray(steps, dtype=float).ravel()
    log_lo = np.full(q.shape, np.log(lo))
    log_hi = np.full(q.shape, np.log(hi))
    for _ in range(iters):
        mid = (log_lo + log_hi) / 2
        ok = epsilon_rdp(np.exp(mid), q, steps, delta) <= epsilon
        log_hi = np.where(ok, mid, log_hi)
        log_lo = np.where(ok, log_lo, mid)
    return np.exp(log_hi)
