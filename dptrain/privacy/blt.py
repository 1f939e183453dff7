"""Buffered linear Toeplitz (BLT) strategies: correlated noise from a few buffers, no amplification.

A BLT strategy C is lower-triangular Toeplitz with first column c_0 = 1, c_t = Σ_i ω_i θ_i^(t-1)
(t ≥ 1): d buffers with decays θ_i and scales ω_i (Dvijotham, McMahan, Pillutla, Steinke,
Thakurta, 2024). The noise w = C⁻¹z is the recursion  w_t = z_t − Σ_i ω_i s_i,
s_i ← θ_i s_i + w_t  (s = 0 at the start): d model-sized buffers, however long the run, where a
banded C needs b-1.

Privacy. No amplification-by-sampling analysis of BLT can be certified today (only Monte Carlo
estimates exist), so a BLT run is accounted as the Gaussian mechanism it is without sampling. The
units are split into P parts (each unit into one part, uniformly at random and independently);
step t samples part t mod P only (the cyclic sampler BandMF uses, at rate P·B/N ≤ 1 within the
part), so a unit joins at most ⌈T/P⌉ steps, any two at least P apart. With θ ∈ (0, 1), ω > 0 and
Σω ≤ 1, C's first column is positive and non-increasing, and then the sensitivity of Cx under that
participation is attained by joining steps 0, P, 2P, ... (Kalinin & Lampert 2024, Thm. 2; the
check behind jax_privacy's `minsep_sensitivity_squared`): sens² = ‖C u*‖². Releasing the first t
rows of Cx + σz is one Gaussian mechanism at noise multiplier σ / ‖(C u*)[:t]‖. The ledger charges
round r (P steps, at its first step, like BandMF's rounds) as a Gaussian at q = 1 whose 1/σ² is the
round's share of sens²/σ²; Gaussians compose by adding 1/σ², so every prefix is covered and the
whole run is charged exactly the Gaussian at σ / sens (over whole rounds).

C is chosen like BandMF's, for the prefix-sum workload: minimise sens² · ‖S C⁻¹‖²_F over (θ, ω).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from dptrain.errors import UserError
from dptrain.privacy.correlated import CorrelatedNoise, noise_error

MAX_AUTO_BUFFERS = 4  # more buffers rarely help (jax_privacy stops when one more gains < 1%)
MAX_PARTS = 65535  # parts of the cyclic sampling (a uint16 per unit)


def parts_for(sampling_rate: float, steps: int) -> int:
    """P: as many parts as hold an expected batch each (min-separation N/B), at most one per step."""
    return max(1, min(int(1 / sampling_rate + 1e-9), int(steps), MAX_PARTS))


def sensitivity(blt: "BLT", parts: int, steps: int) -> float:
    """The min-separation sensitivity of C over the whole rounds `steps` steps touch (what the
    ledger charges: a round in full at its first step)."""
    rounds = -(-int(steps) // parts)
    return math.sqrt(float(blt.round_shares(parts, rounds).sum())) if rounds else 0.0


def _polynomials(decays, scales) -> tuple[np.ndarray, np.ndarray]:
    """(N, Q) with c(z) = N(z) / Q(z): Q = Π(1 − θ_i z), N = Q + z Σ_i ω_i Π_{j≠i}(1 − θ_j z)."""
    q = np.array([1.0])
    for theta in decays:
        q = np.convolve(q, [1.0, -theta])
    n = np.append(q, 0.0)
    for i, omega in enumerate(scales):
        others = np.array([1.0])
        for j, theta in enumerate(decays):
            if j != i:
                others = np.convolve(others, [1.0, -theta])
        n[1:1 + len(others)] += omega * others
    return n, q


@dataclass(frozen=True)
class BLT:
    decays: tuple[float, ...]   # θ_i in (0, 1)
    scales: tuple[float, ...]   # ω_i > 0, Σω ≤ 1

    def __post_init__(self):
        if len(self.decays) != len(self.scales) or not self.decays:
            raise UserError("a BLT strategy needs as many decays as scales, at least one")
        if not all(0 < t < 1 for t in self.decays) or not all(w > 0 for w in self.scales) \
                or math.fsum(self.scales) > 1 + 1e-12:
            raise UserError("a BLT strategy needs decays in (0, 1), positive scales summing to at most 1 "
                            "(what makes its columns non-increasing, which its sensitivity bound assumes)")

    @property
    def buffers(self) -> int:
        return len(self.decays)

    def strategy_coefficients(self, steps: int) -> np.ndarray:
        """C's first column, `steps` terms: 1, Σω, Σωθ, Σωθ², ..."""
        from scipy.signal import lfilter

        n, q = _polynomials(self.decays, self.scales)
        impulse = np.zeros(steps)
        impulse[0] = 1.0
        return lfilter(n, q, impulse)

    def noise_coefficients(self, steps: int) -> np.ndarray:
        """C⁻¹'s first column: the noise of step t is Σ_s h_{t-s} z_s."""
        from scipy.signal import lfilter

        n, q = _polynomials(self.decays, self.scales)
        impulse = np.zeros(steps)
        impulse[0] = 1.0
        return lfilter(q, n, impulse)

    def worst_rows(self, parts: int, steps: int) -> np.ndarray:
        """C u* for the worst participation u* (steps 0, P, 2P, ...): its squared entries are each
        step's share of sens²."""
        from scipy.signal import fftconvolve

        c = self.strategy_coefficients(steps)
        comb = np.zeros(steps)
        comb[::parts] = 1.0
        return fftconvolve(comb, c)[:steps] if steps > 64 else np.convolve(comb, c)[:steps]

    def round_shares(self, parts: int, rounds: int) -> np.ndarray:
        """sens² accrued by each of the first `rounds` rounds of `parts` steps (whole rounds)."""
        rows = self.worst_rows(parts, rounds * parts) ** 2
        return rows.reshape(rounds, parts).sum(axis=1)

    def row_bound(self, parts: int) -> float:
        """A bound on |(C u)_t| for any row and any participation P apart: Σ_j c_{jP} (c non-increasing,
        so the latest possible participations weigh most). What a second release of a step is charged at."""
        return 1.0 + sum(w * t ** (parts - 1) / (1 - t ** parts) for t, w in zip(self.decays, self.scales))

    @property
    def lag(self) -> float | None:
        """λ when θ = ω = λ (one buffer): then C⁻¹ = I − λS, each step's noise is z_t − λ z_{t−1}, and
        replayable streams can draw z_{t−1} again instead of keeping it (`RegeneratedNoise`)."""
        return self.decays[0] if self.decays == self.scales and len(self.decays) == 1 else None

    def state(self) -> dict:
        return {"decays": list(self.decays), "scales": list(self.scales)}


def _unpack(x: np.ndarray, buffers: int) -> BLT:
    """(d decay logits, d share logits, one total logit) -> BLT: θ = sigmoid, ω = sigmoid(total) ·
    softmax(shares), so every point is a valid strategy."""
    decays = 1 / (1 + np.exp(-x[:buffers]))
    share = np.exp(x[buffers:2 * buffers] - x[buffers:2 * buffers].max())
    scales = share / share.sum() / (1 + math.exp(-x[2 * buffers]))
    return BLT(tuple(float(np.clip(t, 1e-9, 1 - 1e-9)) for t in decays),
               tuple(float(max(w, 1e-12)) for w in scales))


def loss(blt: BLT, steps: int, parts: int) -> float:
    """sens² · ‖S C⁻¹‖²_F: the summed iterate noise variance at the σ a fixed budget allows."""
    rounds = -(-steps // parts)
    return float(blt.round_shares(parts, rounds).sum()) * noise_error(blt.noise_coefficients(steps))


def optimize_lag(steps: int, parts: int) -> BLT:
    """The one-parameter BLT θ = ω = λ (no buffer where the noise is regenerated) minimising `loss`:
    bounded golden-section search over λ, deterministic."""
    from scipy.optimize import minimize_scalar

    res = minimize_scalar(lambda lam: math.log(loss(BLT((lam,), (lam,)), steps, parts)),
                          bounds=(1e-6, 1 - 1e-6), method="bounded", options={"xatol": 1e-9})
    return BLT((float(res.x),), (float(res.x),))


def optimize_blt(steps: int, parts: int, buffers: int) -> BLT:
    """The d-buffer BLT minimising `loss` for `steps` steps at min-separation `parts` (d = 0: the
    regenerated one, `optimize_lag`). Deterministic (fixed starts, derivative-free Powell), so a
    resume plans the same C."""
    from scipy.optimize import minimize

    if int(buffers) != buffers or not 0 <= buffers <= 8:
        raise UserError(f"privacy.buffers must be an integer in [0, 8], got {buffers!r}")
    if buffers == 0:
        return optimize_lag(steps, parts)

    def objective(x):
        try:
            value = loss(_unpack(x, buffers), steps, parts)
        except UserError:
            return 1e300
        return math.log(value) if math.isfinite(value) and value > 0 else 1e300

    best = None
    for spread, total in itertools.product((1.0, 3.0), (0.0, 2.0)):
        # decays spread from 1 - 1/T (a buffer as long as the run) to 1/2, equal shares
        decays = 1 - np.geomspace(1 / steps, 0.5, buffers) ** (1 / spread)
        x0 = np.concatenate([np.log(decays / (1 - decays)), np.zeros(buffers), [total]])
        res = minimize(objective, x0, method="Powell", options={"xtol": 1e-6, "ftol": 1e-10, "maxfev": 4000})
        if best is None or res.fun < best.fun:
            best = res
    return _unpack(best.x, buffers)


def choose_buffers(steps: int, parts: int, max_buffers: int = MAX_AUTO_BUFFERS) -> BLT:
    """The fewest buffers past which one more gains under 1% of `loss` (at most `max_buffers`)."""
    best = optimize_blt(steps, parts, 1)
    for d in range(2, max_buffers + 1):
        more = optimize_blt(steps, parts, d)
        if loss(more, steps, parts) > 0.99 * loss(best, steps, parts):
            break
        best = more
    return best


class BLTNoise(CorrelatedNoise):
    """The correlated noise w = C⁻¹z of a BLT strategy: w_t = z_t − Σ_i ω_i s_i, then s_i ← θ_i s_i + w_t,
    from d buffers per noised tensor (dptrain.privacy.correlated)."""

    def __init__(self, source, blt: BLT) -> None:
        super().__init__(source)
        self.blt = blt

    def strategy_state(self) -> dict:
        return {"blt": self.blt.state()}

    def _new_buffers(self, w) -> list:
        import torch

        return [torch.zeros_like(w) for _ in self.blt.decays]

    def _correlate(self, w, buffers: list) -> None:
        for s, omega in zip(buffers, self.blt.scales):
            w.sub_(s.to(w.device), alpha=omega)
        for j, (s, theta) in enumerate(zip(buffers, self.blt.decays)):
            buffers[j] = s.to(w.device).mul_(theta).add_(w)


class RegeneratedNoise(CorrelatedNoise):
    """The noise of a BLT with C⁻¹ = I − λS (`BLT.lag`) and no buffer: w_t = z_t − λ z_{t−1}, the
    previous step's draw made again from its keyed stream (the regeneration of DP-λCGD). One more
    draw per step instead of a model-sized buffer; secure randomness cannot replay a draw, so there
    the same noise comes from `BLTNoise`'s one buffer."""

    def __init__(self, source, blt: BLT) -> None:
        if source.secure or blt.lag is None:
            raise ValueError("regenerated noise needs replayable (keyed) streams and a strategy with C⁻¹ = I − λS")
        super().__init__(source)
        self.blt = blt

    def strategy_state(self) -> dict:
        return {"blt": self.blt.state(), "regenerated": True}  # not BLTNoise's buffers: refused there

    def _new_buffers(self, w) -> list:
        return []

    def _correlate(self, w, buffers: list) -> None:
        pass  # the correlation needs the previous draw, which for_step makes again

    def for_step(self, step: int, rank: int = 0):
        import torch

        draw = super().for_step(step, rank)
        earlier = self.source.for_step(step - 1, rank) if step else None

        def noise(shape, device="cpu", dtype=None):
            w = draw(shape, device, torch.float32)
            if earlier is not None:  # the same tensor of the previous step: the same shape, in the same order
                w.sub_(earlier(shape, device, torch.float32), alpha=self.blt.lag)
            return w if dtype is None else w.to(dtype)

        return noise


def round_charge(blt: BLT, parts: int, noise_multiplier: float, step: int):
    """What step `step` (1-based) of a BLT run adds to the ledger: at a round's first step, a
    Gaussian (q = 1) whose 1/σ'² is the round's share of sens²/σ²; nothing at the others."""
    from dptrain.privacy.accounting import make_run

    if (step - 1) % parts:
        return make_run(noise_multiplier, 1.0, 0)
    r = (step - 1) // parts
    share = float(blt.round_shares(parts, r + 1)[r])
    return make_run(noise_multiplier / math.sqrt(share), 1.0, 1)


def second_release_charge(blt: BLT, parts: int, noise_multiplier: float):
    """A step released again with other noise (a crash lost it, secure randomness cannot replay it):
    one more Gaussian release of one row of Cx, whose sensitivity is at most `row_bound`."""
    from dptrain.privacy.accounting import make_run

    return make_run(noise_multiplier / blt.row_bound(parts), 1.0, 1)


def from_state(state: dict) -> BLT:
    return BLT(tuple(float(t) for t in state["decays"]), tuple(float(w) for w in state["scales"]))
