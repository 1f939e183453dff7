"""Banded matrix factorization (BandMF): correlated noise that partly cancels across steps.

DP-SGD releases x_t + σC z_t with z_t independent. The matrix mechanism releases x̂ = x + σC·C⁻¹z
for a lower-triangular strategy C; the model is a prefix sum of the released gradients, so its
noise is S C⁻¹ z (S: lower-triangular ones), which for a good C grows far more slowly than DP-SGD's
S z. Here C is banded Toeplitz: row t is c_0..c_{b-1} on the diagonal and the b-1 below it, so the
noise of step t is the recurrence  c_0 w_t = z_t − c_1 w_{t-1} − … − c_{b-1} w_{t-b+1}, which needs
the last b-1 noise tensors (b-1 model-sized buffers) and nothing else.

Privacy (Choquette-Choo et al., "Amplified Banded Matrix Factorization", NeurIPS 2023, Thm. 4; the
same event as jax_privacy's `amplified_bandmf_event`): the units are split into b parts, each unit
into a part uniformly at random and independently of the others; step t Poisson-samples at rate q_b
from part t mod b only. With columns of C of norm at most 1, a unit's contributions at steps
j, j+b, j+2b, ... touch disjoint rows of C x, so the run is exactly ⌈T/b⌉ rounds of the
Poisson-subsampled Gaussian mechanism at σ and q_b. With q_b = b·B/N the expected batch stays B.
b = 1 is DP-SGD.

C is chosen for the prefix-sum workload (the error of every model iterate under plain SGD):
minimise ‖S C⁻¹‖²_F subject to ‖c‖ = 1 (the sensitivity), by L-BFGS on the b coefficients from the
square root of S (Fichtenberger et al.'s near-optimal Toeplitz factorization) as starting point.
The expected squared error summed over iterates is σ²·‖S C⁻¹‖²_F, which is what `choose_bands` compares
(σ calibrated for each b, since b changes the rounds and the sampling rate).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dptrain.errors import UserError
from dptrain.privacy.correlated import CorrelatedNoise, noise_error

# Largest number of bands dptrain picks by itself: b-1 model-sized buffers is the memory cost.
MAX_AUTO_BANDS = 64


def accounted(bands: int, sampling_rate: float, steps: int) -> tuple[float, int]:
    """(rate, count) of the subsampled Gaussian events `steps` steps of b-band BandMF compose to,
    at overall rate q = B/N: rate b·q within a part, ⌈steps / b⌉ rounds (b = 1: DP-SGD's q, steps)."""
    if int(bands) != bands or bands < 1:
        raise UserError(f"bands must be a positive integer, got {bands!r}")
    rate = bands * sampling_rate
    if rate > 1 + 1e-12:
        raise UserError(f"{bands} bands at sampling rate {sampling_rate:g} would sample each part at rate "
                        f"{rate:g} > 1: use at most {int(1 / sampling_rate)} bands")
    return min(rate, 1.0), -(-int(steps) // int(bands))


def opens_round(step: int, bands: int) -> bool:
    """Whether step `step` (1-based, from the run's start) is the first of a round of b steps: where
    the ledgers charge the round, so every prefix of the run is covered."""
    return (step - 1) % bands == 0


def _inverse_series(c: np.ndarray, steps: int) -> np.ndarray:
    """First column of C⁻¹ (Toeplitz, lower triangular): the power series 1 / c(z), `steps` terms."""
    from scipy.signal import lfilter

    impulse = np.zeros(steps)
    impulse[0] = 1.0
    return lfilter([1.0], c, impulse)


def prefix_error(coefficients, steps: int) -> float:
    """‖S C⁻¹‖²_F for the banded Toeplitz C with first column `coefficients`, over `steps` steps:
    the summed variance of the noise in every iterate of SGD, per unit of (σC)²."""
    return noise_error(_inverse_series(np.asarray(coefficients, dtype=np.float64), steps))


def _error_and_gradient(v: np.ndarray, steps: int) -> tuple[float, np.ndarray]:
    """h(v) = ‖S C(v)⁻¹‖²_F · ‖v‖², the error of the normalised c = v/‖v‖ (so h is scale-free), and ∇h.

    With r = 1/c as power series, ∂r/∂c_j = −z^j r²; f = Σ_k (T-k) R_k² with R = cumsum(r)."""
    with np.errstate(all="ignore"):  # an unstable c (a root inside the unit disk) overflows: rejected below
        r = _inverse_series(v, steps)
        cumulative = np.cumsum(r)
        weights = steps - np.arange(steps)
        f = float(np.sum(weights * cumulative ** 2))
    if not math.isfinite(f) or f > 1e300:
        return 1e300, np.zeros_like(v)
    g = np.cumsum((2 * weights * cumulative)[::-1])[::-1]  # ∂f/∂r_m = Σ_{k≥m} 2 w_k R_k
    size = 1 << int(2 * steps - 1).bit_length()
    rr = np.fft.irfft(np.fft.rfft(r, size) ** 2, size)[:steps]  # r * r, first `steps` terms
    grad_f = np.array([-np.dot(g[j:], rr[:steps - j]) for j in range(len(v))])
    norm2 = float(v @ v)
    return f * norm2, grad_f * norm2 + 2 * f * v


def square_root_coefficients(bands: int) -> np.ndarray:
    """The first `bands` coefficients of (1 - z)^(-1/2): 1, 1/2, 3/8, 5/16, ..."""
    out = np.ones(bands)
    for j in range(1, bands):
        out[j] = out[j - 1] * (2 * j - 1) / (2 * j)
    return out


def optimize_coefficients(steps: int, bands: int) -> tuple[float, ...]:
    """The banded Toeplitz strategy for `steps` steps: c_0 > 0, ‖c‖ = 1, minimising ‖S C⁻¹‖²_F.
    Deterministic (same inputs, same coefficients), so a resume plans the same C."""
    from scipy.optimize import minimize

    if int(bands) != bands or bands < 1:
        raise UserError(f"privacy.bands must be a positive integer, got {bands!r}")
    if bands > steps:
        raise UserError(f"privacy.bands {bands} exceeds privacy.steps {steps}: a band longer than the run "
                        "is never used")
    if bands == 1:
        return (1.0,)
    start = square_root_coefficients(bands)
    result = minimize(_error_and_gradient, start, args=(steps,), jac=True, method="L-BFGS-B",
                      options={"maxiter": 500, "gtol": 1e-10, "ftol": 1e-13})
    best = result.x if result.fun <= _error_and_gradient(start, steps)[0] else start
    c = best / np.linalg.norm(best)
    if c[0] < 0:
        c = -c
    return tuple(float(x) for x in c)


@dataclass(frozen=True)
class BandChoice:
    bands: int
    noise_multiplier: float   # σ that meets the budget with these bands (RDP: used for the choice only)
    error: float              # σ² ‖S C⁻¹‖²_F: the summed noise variance of the iterates, per C²
    coefficients: tuple[float, ...]  # the optimised strategy for these bands


def candidate_bands(steps: int, num_examples: int, expected_batch_size: int,
                    max_bands: int = MAX_AUTO_BANDS) -> list[int]:
    """Powers of two up to the run's length, the data (q_b = b·B/N ≤ 1) and `max_bands`."""
    limit = min(steps, num_examples // expected_batch_size, max_bands)
    out, b = [], 1
    while b <= limit:
        out.append(b)
        b *= 2
    return out


def choose_bands(target_epsilon: float, delta: float, steps: int, num_examples: int,
                 expected_batch_size: int, max_bands: int = MAX_AUTO_BANDS) -> tuple[BandChoice, ...]:
    """For every candidate b: σ meeting the budget (fast RDP calibration, ⌈T/b⌉ rounds at q_b)
    and the resulting error. The first of the returned choices (sorted by error) is the best."""
    from dptrain.privacy.rdp import calibrate_rdp

    choices = []
    for b in candidate_bands(steps, num_examples, expected_batch_size, max_bands):
        q = b * expected_batch_size / num_examples
        sigma = float(calibrate_rdp(target_epsilon, delta, [q], [math.ceil(steps / b)])[0])
        coefficients = optimize_coefficients(steps, b)
        choices.append(BandChoice(b, sigma, sigma ** 2 * prefix_error(coefficients, steps), coefficients))
    return tuple(sorted(choices, key=lambda c: c.error))


class BandedNoise(CorrelatedNoise):
    """The correlated noise of a banded Toeplitz C: w_t = (z_t − Σ_{j≥1} c_j w_{t-j}) / c_0, i.e. w = C⁻¹z,
    from the last b-1 noise tensors of each noised tensor (dptrain.privacy.correlated)."""

    BUFFERS_KEY = "history"  # newest first

    def __init__(self, source, coefficients) -> None:
        super().__init__(source)
        self.coefficients = tuple(float(c) for c in coefficients)

    def strategy_state(self) -> dict:
        return {"coefficients": list(self.coefficients)}

    def _new_buffers(self, w) -> list:
        return []

    def _correlate(self, w, history: list) -> None:
        c = self.coefficients
        for j, past in enumerate(history, start=1):
            w.sub_(past.to(w.device), alpha=c[j])
        w.div_(c[0])
        history.insert(0, w.clone())
        del history[len(c) - 1:]
