"""Certified bounds on the epsilon of T Poisson-subsampled Gaussian steps (add-or-remove-one).

One step adds N(0, s^2) noise to a sensitivity-1 sum that holds the example with probability q:
the pair (A, B) = ((1-q) N(0, s^2) + q N(1, s^2), N(0, s^2)) and its reverse ("remove" and "add")
dominate it, and delta(eps) = max over the two of E_A^T[(1 - exp(eps - S))_+], S the sum of the
T per-step privacy losses L = log(dA/dB). Both ends of the bracket are bounds by construction:

- upper: each cell [k h, k' h) of the loss is replaced by a two-point law on its ends that keeps
  its B- and A-mass (the likelihood ratio is spread keeping its mean: connect-the-dots,
  Doroshenko et al. 2022). Spreads of independent factors keep the product a martingale and
  (u - e^eps)_+ is convex in u, so delta can only grow. Losses below the grid move up to it; a
  step whose loss falls above the grid counts as a full failure (T times its A-mass is added).
- lower: the output is quantized to the cells (post-processing cannot raise delta), each cell's
  exact loss is rounded to the nearest grid point, and the rounding errors (independent, each
  within h/2) are put back as their mean minus a Hoeffding deviation, whose failure probability
  is subtracted.

Cell masses are Gaussian cdf differences (exact up to float error, no quadrature). The T-fold
composition is one FFT power on a circular grid after an exponential tilt that centres the
composed law near the answer (so float round-off stays far below delta). Mass that wraps around
the circle is bounded by Chernoff bounds computed from the same per-step law and accounted for in
the direction that keeps each end a bound. Float round-off itself is not bounded, only kept small.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import fft
from scipy.special import log_ndtr, logsumexp

# Points of the x-grid (in units of the noise std) that place the cell ends: where the loss moves
# faster than one grid step per point the cells get wider (tails), elsewhere every grid step is a
# cell end.
_X_POINTS = 20_000
# A-mass left off the grid (tails of x) is at most this fraction of delta.
_TAIL_SHARE = 1e-9
# The lower end's Hoeffding deviation fails with probability this fraction of delta.
_HOEFFDING_SHARE = 1e-3
# Mass wrapping round the circle is bounded to at most this fraction of delta.
_WRAP_SHARE = 1e-6
_DEBUG = False
_MAX_TILT = 50.0
_ETAS = np.geomspace(1e-3, 1e4, 120)


class CertificationError(ArithmeticError):
    """The numerical bound could not be computed for these parameters (far outside the usual
    range: huge epsilon or enormous step counts). Callers fall back to a looser bound."""


@dataclass(frozen=True)
class Bracket:
    lower: float
    upper: float

    @property
    def width(self) -> float:
        """Relative width (upper - lower) / upper; 0 when both are 0."""
        return 0.0 if self.upper == 0 else (self.upper - self.lower) / self.upper


def _log1mexp(x: np.ndarray) -> np.ndarray:
    """log(1 - exp(x)) for x <= 0, accurate near 0 and for very negative x."""
    x = np.asarray(x, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(x > -math.log(2), np.log(-np.expm1(x)), np.log1p(-np.exp(x)))


def _log_normal_mass(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """log P(lo < Z <= hi) for a standard normal Z, using the tail away from the mode."""
    lo, hi = np.broadcast_arrays(np.asarray(lo, float), np.asarray(hi, float))
    out = np.full(lo.shape, -np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        left = hi <= 0
        la, lb = log_ndtr(lo[left]), log_ndtr(hi[left])
        out[left] = lb + _log1mexp(la - lb)
        right = lo >= 0
        la, lb = log_ndtr(-hi[right]), log_ndtr(-lo[right])
        out[right] = lb + _log1mexp(la - lb)
        mid = ~(left | right)
        out[mid] = _log1mexp(np.logaddexp(log_ndtr(lo[mid]), log_ndtr(-hi[mid])))
    out[~(hi > lo)] = -np.inf
    return out


class _Step:
    """The loss of one step in one direction on a grid of width h."""

    def __init__(self, sigma: float, q: float, steps: int, delta: float, h: float,
                 direction: str):
        self.sigma, self.q, self.h, self.direction = sigma, q, h, direction
        self.sign = 1.0 if direction == "remove" else -1.0
        z = math.sqrt(2 * math.log(max(steps, 1) / (_TAIL_SHARE * delta))) + 1.0
        x = np.linspace(-z * sigma, 1 + z * sigma, _X_POINTS)
        grid_loss = self.loss(x) / h
        ends = np.unique(np.concatenate([np.floor(grid_loss), np.ceil(grid_loss)])).astype(np.int64)
        # x-boundaries of the cells, increasing in x
        bx = self.x_of_loss(ends * h)
        if self.sign < 0:
            ends, bx = ends[::-1], bx[::-1]
        lo_x, hi_x = bx[:-1], bx[1:]
        ln0 = _log_normal_mass(lo_x / sigma, hi_x / sigma)
        ln1 = _log_normal_mass((lo_x - 1) / sigma, (hi_x - 1) / sigma)
        keep = np.isfinite(ln0) & np.isfinite(ln1)
        # loss-grid ends of each cell, k0 < k1
        k_a, k_b = ends[:-1], ends[1:]
        self.k0 = np.minimum(k_a, k_b)[keep]
        self.k1 = np.maximum(k_a, k_b)[keep]
        ln0, ln1 = ln0[keep], ln1[keep]
        lmix = np.logaddexp(math.log1p(-q) + ln0 if q < 1 else -np.inf, math.log(q) + ln1)
        log_ratio = np.log1p(q * np.expm1(ln1 - ln0))  # log(mix / N0) of the cell
        if self.sign > 0:
            self.log_a, self.log_b, self.log_rho = lmix, ln0, log_ratio
        else:
            self.log_a, self.log_b, self.log_rho = ln0, lmix, -log_ratio
        self.log_rho = np.clip(self.log_rho, self.k0 * h, self.k1 * h)
        # the two x-tails beyond the grid: (mass under A, mass under B, loss end they touch)
        x_min, x_max = bx[0], bx[-1]
        tail_left = (float(_log_normal_mass(-np.inf, x_min / sigma)),
                     float(_log_normal_mass(-np.inf, (x_min - 1) / sigma)))
        tail_right = (float(_log_normal_mass(x_max / sigma, np.inf)),
                      float(_log_normal_mass((x_max - 1) / sigma, np.inf)))

        def mix(t):
            return float(np.logaddexp(math.log1p(-q) + t[0] if q < 1 else -np.inf,
                                      math.log(q) + t[1]))

        if self.sign > 0:  # left x-tail = lowest losses, right x-tail = highest
            low, high = tail_left, tail_right
            self.log_b_low, self.log_a_low = low[0], mix(low)
            self.log_a_high = mix(high)
        else:
            low, high = tail_right, tail_left
            self.log_b_low, self.log_a_low = mix(low), low[0]
            self.log_a_high = high[0]
        self.k_min, self.k_max = int(ends.min()), int(ends.max())

    def loss(self, x: np.ndarray) -> np.ndarray:
        s2 = self.sigma ** 2
        with np.errstate(over="ignore"):
            if self.q == 1:
                value = (2 * x - 1) / (2 * s2)
            else:
                value = np.logaddexp(math.log1p(-self.q),
                                     math.log(self.q) + (2 * x - 1) / (2 * s2))
        return self.sign * value

    def x_of_loss(self, s: np.ndarray) -> np.ndarray:
        """x at which the loss equals s (monotone inverse; +-inf beyond its range)."""
        ell = self.sign * s  # value of log(1 - q + q exp((2x - 1) / (2 s^2)))
        with np.errstate(divide="ignore", invalid="ignore"):
            inner = np.expm1(ell) + self.q
            x = 0.5 + self.sigma ** 2 * (np.log(np.where(inner > 0, inner, np.nan))
                                         - math.log(self.q))
        return np.where(inner > 0, x, -np.inf)

    def upper_atoms(self) -> tuple[np.ndarray, np.ndarray, float]:
        """(grid index, log A-weight) of the spread law, and the A-mass sent to infinity."""
        h = self.h
        span = (self.k1 - self.k0) * h
        u = self.log_rho - self.k0 * h
        with np.errstate(divide="ignore"):
            den = np.log(np.expm1(span))
            lw0 = self.log_a + np.log(np.expm1(span - u)) - den
            lw1 = self.log_b + np.log(np.expm1(u)) - den + self.k1 * h
        k = np.concatenate([self.k0, self.k1, [self.k_min]])
        lw = np.concatenate([lw0, lw1, [self.log_b_low + self.k_min * h]])
        return k, lw, math.exp(self.log_a_high)

    def lower_atoms(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(grid index, log A-weight, rounding error) of the quantized, rounded law."""
        k = np.round(self.log_rho / self.h).astype(np.int64)
        return k, self.log_a, self.log_rho - k * self.h


def _compose(k: np.ndarray, lw: np.ndarray, h: float, steps: int, theta: float, base: int,
             n: int) -> np.ndarray:
    """A-weights of the T-fold sum on grid indices base .. base + n - 1 (circular, tilted)."""
    tilted = lw + theta * k * h
    log_z = logsumexp(tilted)
    circle = np.bincount(np.mod(k, n), weights=np.exp(tilted - log_z), minlength=n)
    spectrum = fft.rfft(circle)
    power = np.ones_like(spectrum)
    e = steps
    while e:  # binary exponentiation keeps round-off growth logarithmic in the multiplications
        if e & 1:
            power = power * spectrum
        e >>= 1
        if e:
            spectrum = spectrum * spectrum
    circular = fft.irfft(power, n)
    idx = np.arange(base, base + n)
    return circular[np.mod(idx, n)] * np.exp(steps * log_z - theta * idx * h)


def _epsilon_from(weights: np.ndarray, base: int, h: float, target: float, shift: float,
                  clip: bool) -> float | None:
    """Smallest eps with sum_K w_K (1 - exp(eps - shift - K h))_+ <= target.

    None if it is not inside the window (the caller widens it). `clip` drops negative round-off
    weights (raising the sum: right for an upper bound, wrong for a lower one).
    """
    if target <= 0:
        return None
    s = (base + np.arange(weights.size)) * h + shift
    w = np.maximum(weights, 0.0) if clip else weights
    ref = s[s.size // 2]  # exp(ref - s) stays in range over the window
    tail0 = np.cumsum(w[::-1])[::-1]
    tail1 = np.cumsum((w * np.exp(ref - s))[::-1])[::-1]
    above0 = np.append(tail0[1:], 0.0)  # atoms strictly above s_j
    above1 = np.append(tail1[1:], 0.0)
    d_at = above0 - np.exp(s - ref) * above1  # the sum at eps = s_j
    if d_at[0] <= target:
        return -math.inf if s[0] <= 0 else None  # eps lies below the window (-inf: below 0)
    j = int(np.argmax(d_at <= target))
    if d_at[j] > target:
        return None  # eps lies above the window
    j -= 1  # eps in (s_j, s_{j+1}]: the sum is above0_j - exp(eps - ref) above1_j
    if above1[j] <= 0:
        return float(s[j + 1])
    eps = ref + math.log(max(above0[j] - target, 1e-300) / above1[j]) if above1[j] > 0 \
        else s[j + 1]
    return float(min(max(eps, s[j]), s[j + 1]))



class _Mgf:
    """log E[exp(eta L)] of a per-step law given by atoms (grid index, log weight), at the fixed
    sets of eta the bounds below minimise over (each set computed once)."""

    def __init__(self, k: np.ndarray, lw: np.ndarray, h: float):
        self.s, self.lw = k * h, lw
        self.log_total = float(logsumexp(lw))
        self._cache: dict[float, np.ndarray] = {}

    def at(self, offset: float, sign: float = 1.0) -> np.ndarray:
        """log M(offset + sign * eta) for every eta in _ETAS."""
        key = (offset, sign)
        if key not in self._cache:
            etas = offset + sign * _ETAS
            self._cache[key] = np.array([logsumexp(self.lw + e * self.s) for e in etas])
        return self._cache[key]

    def log_tail_above(self, steps: int, s: float, tilt: float = 0.0) -> float:
        """log of a bound on E[exp(tilt S); S >= s] for the sum S of `steps` draws."""
        return float(np.min(steps * self.at(tilt) - _ETAS * s))

    def log_tail_below(self, steps: int, s: float) -> float:
        """log of a bound on P(S < s), S the sum of `steps` draws."""
        return float(min(np.min(steps * self.at(0.0, -1.0) + _ETAS * s),
                         steps * self.log_total))


def _tilted_bulk(k: np.ndarray, lw: np.ndarray, h: float, steps: int, theta: float) -> float:
    """Mean minus 8 standard deviations of the tilted law of the T-fold sum."""
    tilted = lw + theta * k * h
    p = np.exp(tilted - logsumexp(tilted))
    mean = float(np.sum(p * k * h))
    var = float(np.sum(p * (k * h - mean) ** 2))
    return steps * mean - 8 * math.sqrt(steps * var)


def _plan(mgf: _Mgf, steps: int, delta: float) -> tuple[float, float]:
    """(tilt, Chernoff estimate of eps): min over eta of (T log M(eta) - log delta) / eta."""
    eps_ch = (steps * mgf.at(0.0) - math.log(delta)) / _ETAS
    i = int(np.argmin(eps_ch))
    return float(_ETAS[i]), float(eps_ch[i])


def _log_wrap(mgf: _Mgf, steps: int, theta: float, s_lo: float, s_hi: float) -> float:
    """log of a bound on the A-weight that the circular window folds into itself.

    From above: a sum S >= s_hi lands at S - m W >= s_lo with its weight multiplied by at most
    exp(theta (S - s_lo)). From below: a sum S < s_lo lands higher, its weight multiplied by at
    most exp(-theta W).
    """
    above = -theta * s_lo + mgf.log_tail_above(steps, s_hi, theta)
    below = -theta * (s_hi - s_lo) + mgf.log_tail_below(steps, s_lo)
    return float(np.logaddexp(above, below))


def _rdp_delta_bound(mgf: _Mgf, steps: int, eps: float) -> float:
    """delta(eps) <= min_eta M(eta)^T exp(-eta eps) (eta/(1+eta))^eta / (1+eta)."""
    etas = _ETAS
    log_c = etas * np.log(etas / (1 + etas)) - np.log1p(etas)
    return math.exp(min(float(np.min(steps * mgf.at(0.0) - etas * eps + log_c)), 0.0))


def _direction_bound(sigma: float, q: float, steps: int, delta: float, direction: str,
                     grid: int, lower: bool) -> float:
    """An upper (or lower) bound on eps(delta) for one direction of the pair."""
    # A first pass at a resolution tied to the per-step loss's spread places the window and the
    # tilt. These choices only affect tightness and speed: every bound below holds for any.
    spread = q * math.sqrt(math.expm1(min(1 / sigma ** 2, 700.0))) if q < 1 else 1 / sigma
    h1 = min(max(spread / 20, 1e-8), 1e-2)
    k, lw, _ = _Step(sigma, q, steps, delta, h1, direction).upper_atoms()
    mgf = _Mgf(k, lw, h1)
    theta_c, eps_c = _plan(mgf, steps, delta)
    # The Chernoff tilt overshoots the answer's local slope; a very steep tilt would overflow.
    theta = min(theta_c / 2, _MAX_TILT)
    s_lo = eps_c / 2 - 1.0
    budget = math.log(_WRAP_SHARE * delta)
    for _ in range(8):
        width = max(1.0, eps_c - s_lo)
        for factor in (1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64):
            s_hi = eps_c + factor * width
            if _log_wrap(mgf, steps, theta, s_lo, s_hi) < budget - 1:
                break
        h = (s_hi - s_lo) / grid
        step = _Step(sigma, q, steps, delta, h, direction)
        if lower:
            k, lw, r = step.lower_atoms()
            # Bernstein: the rounding errors r (|r - mean| <= h) of the T steps sum to at least
            # T mean - dev except with probability HOEFFDING_SHARE * delta
            p = np.exp(lw - logsumexp(lw))
            mean_r = float(np.sum(p * r))
            var_r = float(np.sum(p * (r - mean_r) ** 2))
            log_fail = math.log(1 / (_HOEFFDING_SHARE * delta))
            b = h * log_fail / 3
            shift = steps * mean_r - (b + math.sqrt(b * b + 2 * steps * var_r * log_fail))
        else:
            k, lw, a_inf = step.upper_atoms()
            shift = 0.0
        # the window holds the sums S with S + shift in [s_lo, s_hi] ...
        base = math.floor((s_lo - shift) / h)
        lo_edge, hi_edge = base * h, (base + grid) * h
        # ... and the tilted law's bulk, or round-off there would be blown up by the untilting
        bulk = _tilted_bulk(k, lw, h, steps, theta)
        if bulk < lo_edge:
            s_lo = bulk + shift
            continue
        mgf = _Mgf(k, lw, h)
        wrap = math.exp(min(_log_wrap(mgf, steps, theta, lo_edge, hi_edge), 0.0))
        eps = None
        if lower and wrap <= _WRAP_SHARE * delta:
            composed = _compose(k, lw, h, steps, theta, base, grid)
            eps = _epsilon_from(composed, base, h, delta + wrap + _HOEFFDING_SHARE * delta,
                                shift, clip=False)
        elif not lower:
            above = math.exp(min(mgf.log_tail_above(steps, hi_edge), 0.0))
            off_grid = -math.expm1(steps * math.log1p(-a_inf)) if a_inf < 1 else 1.0
            if max(wrap, above) <= _WRAP_SHARE * delta:
                composed = _compose(k, lw, h, steps, theta, base, grid)
                eps = _epsilon_from(composed, base, h, delta - above - off_grid, 0.0, clip=True)
        if _DEBUG:
            print(direction, "lower" if lower else "upper", "theta", theta, "window", lo_edge,
                  hi_edge, "h", h, "eps", eps)
        if eps is not None and not math.isnan(eps):
            return max(eps, 0.0)
        s_lo -= 1.0 + abs(s_lo)  # the answer lies below the window, or the window leaked
    raise CertificationError(f"certified accountant found no window for sigma={sigma}, q={q}, "
                       f"steps={steps}, delta={delta}")


def _trivial(sigma: float, q: float, steps: int) -> float | None:
    if steps == 0 or q == 0:
        return 0.0
    if sigma == 0:
        return math.inf
    return None


def _guarded(fn):
    def wrapper(*args, **kwargs):
        with np.errstate(all="ignore"):
            try:
                return fn(*args, **kwargs)
            except (OverflowError, ValueError, FloatingPointError, ZeroDivisionError) as e:
                raise CertificationError(f"certified accountant failed: {e}") from None
    wrapper.__doc__, wrapper.__name__ = fn.__doc__, fn.__name__
    return wrapper


@_guarded
def epsilon_upper(sigma: float, q: float, steps: int, delta: float, grid: int = 2 ** 18) -> float:
    """An upper bound on eps(delta) of `steps` Poisson-subsampled Gaussian steps.

    Raises CertificationError where it cannot be computed (far outside the usual range)."""
    trivial = _trivial(sigma, q, steps)
    if trivial is not None:
        return trivial
    eps = _direction_bound(sigma, q, steps, delta, "remove", grid, lower=False)
    # The reverse pair usually has the smaller eps; an RDP-style bound often shows it cheaply.
    h = min(max(q / 100, 1e-8), 1e-3)
    k, lw, a_inf = _Step(sigma, q, steps, delta, h, "add").upper_atoms()
    if a_inf == 0 and _rdp_delta_bound(_Mgf(k, lw, h), steps, eps) <= delta:
        return eps
    return max(eps, _direction_bound(sigma, q, steps, delta, "add", grid, lower=False))


@_guarded
def epsilon_lower(sigma: float, q: float, steps: int, delta: float, grid: int = 2 ** 18) -> float:
    """A lower bound on eps(delta) of `steps` Poisson-subsampled Gaussian steps (from the
    remove direction; eps is the larger of the two directions', so this bounds it from below)."""
    trivial = _trivial(sigma, q, steps)
    if trivial is not None:
        return trivial
    return _direction_bound(sigma, q, steps, delta, "remove", grid, lower=True)


def epsilon_bracket(sigma: float, q: float, steps: int, delta: float,
                    grid: int = 2 ** 18) -> Bracket:
    return Bracket(epsilon_lower(sigma, q, steps, delta, grid),
                   epsilon_upper(sigma, q, steps, delta, grid))
