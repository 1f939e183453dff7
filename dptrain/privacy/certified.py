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
  within h/2) are put back as their mean minus a Bernstein deviation, whose failure probability
  is subtracted.

Cell masses are Gaussian cdf differences (exact up to float error, no quadrature). The T-fold
composition is one FFT power on a circular grid after an exponential tilt that centres the
composed law near the answer (so float round-off stays far below delta). Mass that wraps around
the circle is bounded by Chernoff bounds computed from the same per-step law and accounted for in
the direction that keeps each end a bound. Float round-off is estimated (the usual FFT error norm, grown by the
powers, spread over the entries, times 10) and counted against both ends; it is not proven.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import fft
from scipy.special import log_ndtr, logsumexp

# Points of the output grid that place the cell ends: where the loss moves faster than one loss
# grid step per point the cells get wider (tails), elsewhere every loss grid step is a cell end.
_X_POINTS = 20_000
# The output grid reaches far enough that T times the mass beyond it is about this share of delta
# (that mass is still accounted for exactly, only more coarsely).
_TAIL_SHARE = 1e-9
# The lower end's Bernstein deviation fails with probability this share of delta.
_BERNSTEIN_SHARE = 1e-3
# Weight wrapping round the circle may be at most this share of delta.
_WRAP_SHARE = 1e-6
_BELOW, _ABOVE = "below", "above"  # where eps lies when the window misses it
_MAX_TILT = 50.0  # steeper tilts overflow
_ETAS = np.geomspace(1e-3, 1e4, 60)  # the exponents Chernoff bounds minimise over


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


def _compose(laws: list[tuple[np.ndarray, np.ndarray, int]], h: float, theta: float, base: int,
             n: int) -> np.ndarray:
    """A-weights of the sum (`steps` draws of each law) on grid indices base .. base + n - 1,
    and an estimate of the float round-off in each.

    Computed on a circle of n points after tilting by exp(theta s); see _log_wrap for what folds.
    """
    total = np.ones(n // 2 + 1, dtype=complex)
    log_scale = 0.0
    for k, lw, steps in laws:
        tilted = lw + theta * k * h
        log_z = logsumexp(tilted)
        log_scale += steps * log_z
        circle = np.bincount(np.mod(k, n), weights=np.exp(tilted - log_z), minlength=n)
        spectrum = fft.rfft(circle)
        e = steps
        while e:  # binary exponentiation: round-off grows with the number of multiplications
            if e & 1:
                total = total * spectrum
            e >>= 1
            if e:
                spectrum = spectrum * spectrum
    circular = fft.irfft(total, n)
    idx = np.arange(base, base + n)
    scale = np.exp(log_scale - theta * idx * h)
    # Round-off: the FFT's error has norm about machine epsilon times log n times the signal's
    # norm, and the powers add the spectrum's relative errors up; spread evenly over the n
    # entries, with a safety factor of 10.
    steps = sum(t for _, _, t in laws)
    noise = 10 * 2.2e-16 * (steps + math.log2(n)) * float(np.linalg.norm(circular)) / math.sqrt(n)
    return circular[np.mod(idx, n)] * scale, noise * scale


def _epsilon_from(weights: np.ndarray, base: int, h: float, target: float, shift: float,
                  clip: bool) -> float | str:
    """Smallest eps with sum_K w_K (1 - exp(eps - shift - K h))_+ <= target.

    _BELOW or _ABOVE if it is not inside the window (the caller moves it). `clip` drops negative round-off
    weights (raising the sum: right for an upper bound, wrong for a lower one).
    """
    if target <= 0:
        return _ABOVE
    s = (base + np.arange(weights.size)) * h + shift
    w = np.maximum(weights, 0.0) if clip else weights
    ref = s[s.size // 2]  # exp(ref - s) stays in range over the window
    tail0 = np.cumsum(w[::-1])[::-1]
    tail1 = np.cumsum((w * np.exp(ref - s))[::-1])[::-1]
    above0 = np.append(tail0[1:], 0.0)  # atoms strictly above s_j
    above1 = np.append(tail1[1:], 0.0)
    d_at = above0 - np.exp(s - ref) * above1  # the sum at eps = s_j
    if d_at[0] <= target:
        return -math.inf if s[0] <= 0 else _BELOW  # eps lies below the window (-inf: below 0)
    j = int(np.argmax(d_at <= target))
    if d_at[j] > target:
        return _ABOVE  # eps lies above the window
    j -= 1  # eps in (s_j, s_{j+1}]: the sum is above0_j - exp(eps - ref) above1_j
    if above1[j] <= 0:
        return float(s[j + 1])
    eps = ref + math.log(max(above0[j] - target, 1e-300) / above1[j]) if above1[j] > 0 \
        else s[j + 1]
    return float(min(max(eps, s[j]), s[j + 1]))



def _logsumexp_rows(m: np.ndarray) -> np.ndarray:
    """log(sum(exp(row))) of each row (plain numpy: scipy's logsumexp is slow on many rows)."""
    top = np.max(m, axis=1)
    top = np.where(np.isfinite(top), top, 0.0)
    return np.log(np.sum(np.exp(m - top[:, None]), axis=1)) + top


class _Mgf:
    """log E[exp(eta S)] of the sum S of independent draws: `steps` draws of each per-step law
    given by atoms (grid index, log weight), at the fixed sets of eta the bounds below minimise
    over (each set computed once)."""

    def __init__(self, laws: list[tuple[np.ndarray, np.ndarray, int]], h: float):
        self.laws = [(k * h, lw, steps) for k, lw, steps in laws]
        self.log_total = sum(steps * float(logsumexp(lw)) for _, lw, steps in self.laws)
        self._cache: dict[tuple[float, float], np.ndarray] = {}

    def at(self, offset: float, sign: float = 1.0) -> np.ndarray:
        """log E[exp((offset + sign * eta) S)] for every eta in _ETAS."""
        key = (offset, sign)
        if key not in self._cache:
            etas = offset + sign * _ETAS
            self._cache[key] = sum(steps * _logsumexp_rows(lw[None, :] + etas[:, None] * s)
                                   for s, lw, steps in self.laws)
        return self._cache[key]

    def log_tail_above(self, s: float, tilt: float = 0.0) -> float:
        """log of a bound on E[exp(tilt S); S >= s]."""
        return float(np.min(self.at(tilt) - _ETAS * s))

    def log_tail_below(self, s: float) -> float:
        """log of a bound on P(S < s)."""
        return float(min(np.min(self.at(0.0, -1.0) + _ETAS * s), self.log_total))

    def tilted_bulk(self, theta: float) -> float:
        """Mean minus 8 standard deviations of S under the tilt exp(theta S)."""
        mean = var = 0.0
        for s, lw, steps in self.laws:
            tilted = lw + theta * s
            p = np.exp(tilted - logsumexp(tilted))
            m = float(np.sum(p * s))
            mean += steps * m
            var += steps * float(np.sum(p * (s - m) ** 2))
        return mean - 8 * math.sqrt(var)


def _plan(mgf: _Mgf, delta: float) -> tuple[float, float]:
    """(tilt, Chernoff estimate of eps): min over eta of (log E exp(eta S) - log delta) / eta."""
    eps_ch = (mgf.at(0.0) - math.log(delta)) / _ETAS
    i = int(np.argmin(eps_ch))
    return float(_ETAS[i]), float(eps_ch[i])


def _log_wrap(mgf: _Mgf, theta: float, s_lo: float, s_hi: float) -> float:
    """log of a bound on the A-weight that the circular window folds into itself.

    From above: a sum S >= s_hi lands at S - m W >= s_lo with its weight multiplied by at most
    exp(theta (S - s_lo)). From below: a sum S < s_lo lands higher, its weight multiplied by at
    most exp(-theta W).
    """
    above = -theta * s_lo + mgf.log_tail_above(s_hi, theta)
    below = -theta * (s_hi - s_lo) + mgf.log_tail_below(s_lo)
    return float(np.logaddexp(above, below))


def _rdp_delta_bound(mgf: _Mgf, eps: float) -> float:
    """delta(eps) <= min_eta E[exp(eta S)] exp(-eta eps) (eta/(1+eta))^eta / (1+eta)."""
    etas = _ETAS
    log_c = etas * np.log(etas / (1 + etas)) - np.log1p(etas)
    return math.exp(min(float(np.min(mgf.at(0.0) - etas * eps + log_c)), 0.0))


Mechanism = tuple[float, float, int]  # (noise multiplier, sampling rate, steps)


def _direction_bound(mechs: list[Mechanism], delta: float, direction: str, grid: int,
                     lower: bool) -> float:
    """An upper (or lower) bound on eps(delta) for one direction of the pair."""
    total_steps = sum(t for _, _, t in mechs)

    def steps_at(h):
        return [_Step(sigma, q, total_steps, delta, h, direction) for sigma, q, _ in mechs]

    # A first pass at a resolution tied to the per-step loss's spread places the window and the
    # tilt. These choices only affect tightness and speed: every bound below holds for any.
    spread = max(q * math.sqrt(math.expm1(min(1 / sigma ** 2, 700.0))) if q < 1 else 1 / sigma
                 for sigma, q, _ in mechs)
    h1 = min(max(spread / 20, 1e-8), 1e-2)
    mgf = _Mgf([(*st.upper_atoms()[:2], t) for st, (_, _, t) in zip(steps_at(h1), mechs)], h1)
    theta_c, eps_c = _plan(mgf, delta)
    budget = math.log(_WRAP_SHARE * delta)
    log_fail = math.log(1 / (_BERNSTEIN_SHARE * delta))
    factors = (1, 1.25, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 12, 16, 24, 32, 64, 128)

    def top(theta, s_lo, first):
        """The lowest window top (from factors[first:]) whose wrapped weight is negligible."""
        width = max(min(1.0, eps_c), eps_c - s_lo, 1e-6)
        i = min(first, len(factors) - 1)
        while i < len(factors) - 1 and \
                _log_wrap(mgf, theta, s_lo, eps_c + factors[i] * width) >= budget - 1:
            i += 1
        return i, eps_c + factors[i] * width

    # The window reaches down to half the Chernoff estimate (eps lies above) or further (so that
    # less weight wraps up from below). The Chernoff tilt overshoots the answer's local slope (and
    # a steep one overflows): take the fraction of it and the bottom that need the narrowest
    # window.
    near = eps_c / 2 - min(1.0, eps_c / 2)
    choices = [(min(theta_c * f, _MAX_TILT), near - d) for f in (1 / 2,)
               for d in (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)]
    theta, s_lo = min(choices, key=lambda c: top(c[0], c[1], 0)[1] - c[1])
    first = 0
    for _ in range(10):
        if first >= len(factors):
            break
        first, s_hi = top(theta, s_lo, first)
        # at least `grid` points, more (up to 16 times) where the window is wide next to the
        # per-step loss's spread (a coarse grid blurs small losses over many steps) and, for the
        # lower end, where the rounding errors' deviation would exceed about 0.05% of eps
        n = grid
        while n < 16 * grid and ((s_hi - s_lo) / n > spread / 8 or (
                lower and (s_hi - s_lo) / n * math.sqrt(total_steps * log_fail / 6)
                > 5e-4 * max(eps_c, 1e-2))):
            n *= 2
        h = (s_hi - s_lo) / n
        laws, shift, log_on_grid = [], 0.0, 0.0
        mean_r = var_r = 0.0
        for st, (_, _, t) in zip(steps_at(h), mechs):
            if lower:
                k, lw, r = st.lower_atoms()
                p = np.exp(lw - logsumexp(lw))
                m = float(np.sum(p * r))
                mean_r += t * m
                var_r += t * float(np.sum(p * (r - m) ** 2))
            else:
                k, lw, a_inf = st.upper_atoms()
                log_on_grid += t * math.log1p(-a_inf) if a_inf < 1 else -math.inf
            laws.append((k, lw, t))
        if lower:
            # Bernstein: the rounding errors r (|r - mean| <= h) of all steps sum to at least
            # their mean - dev except with probability BERNSTEIN_SHARE * delta
            b = h * log_fail / 3
            shift = mean_r - (b + math.sqrt(b * b + 2 * var_r * log_fail))
        # the window holds the sums S with S + shift in [s_lo, s_hi] ...
        base = math.floor((s_lo - shift) / h)
        lo_edge, hi_edge = base * h, (base + n) * h
        mgf = _Mgf(laws, h)
        # ... and the tilted law's bulk, or round-off there would be blown up by the untilting
        bulk = mgf.tilted_bulk(theta)
        if bulk < lo_edge:
            s_lo = bulk + shift
            continue
        wrap = math.exp(min(_log_wrap(mgf, theta, lo_edge, hi_edge), 0.0))
        eps = _ABOVE  # the window's top is too low: the wrapped weight is too large
        if lower and wrap <= _WRAP_SHARE * delta:
            composed, noise = _compose(laws, h, theta, base, n)
            eps = _epsilon_from(composed - noise, base, h,
                                delta + wrap + _BERNSTEIN_SHARE * delta, shift, clip=False)
        elif not lower:
            above = math.exp(min(mgf.log_tail_above(hi_edge), 0.0))
            off_grid = -math.expm1(log_on_grid)
            if max(wrap, above) <= _WRAP_SHARE * delta:
                composed, noise = _compose(laws, h, theta, base, n)
                eps = _epsilon_from(composed + noise, base, h, delta - above - off_grid, 0.0,
                                    clip=True)
        if eps == _BELOW:
            s_lo -= 1.0 + abs(s_lo)
        elif eps == _ABOVE:
            first += 1
        elif not math.isnan(eps):
            return max(eps, 0.0)
    raise CertificationError(f"certified accountant found no window for {mechs} at delta {delta}")


def _active(mechs: list[Mechanism]) -> list[Mechanism] | float:
    """The mechanisms that spend privacy, or the epsilon when that is trivial (0 or inf)."""
    active = [(float(sg), float(q), int(t)) for sg, q, t in mechs if t > 0 and q > 0]
    if not active:
        return 0.0
    if any(sg == 0 for sg, _, _ in active):
        return math.inf
    return active


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
def composed_upper(mechs: list[Mechanism], delta: float, grid: int = 2 ** 18) -> float:
    """An upper bound on eps(delta) of the composition of runs (sigma, q, steps).

    Raises CertificationError where it cannot be computed (far outside the usual range)."""
    active = _active(mechs)
    if isinstance(active, float):
        return active
    eps = _direction_bound(active, delta, "remove", grid, lower=False)
    # The reverse pair usually has the smaller eps; an RDP-style bound often shows it cheaply.
    laws, h = [], min(max(min(q for _, q, _ in active) / 100, 1e-8), 1e-3)
    total = sum(t for _, _, t in active)
    for sigma, q, t in active:
        k, lw, a_inf = _Step(sigma, q, total, delta, h, "add").upper_atoms()
        if a_inf > 0:
            break
        laws.append((k, lw, t))
    else:
        if _rdp_delta_bound(_Mgf(laws, h), eps) <= delta:
            return eps
    return max(eps, _direction_bound(active, delta, "add", grid, lower=False))


@_guarded
def composed_lower(mechs: list[Mechanism], delta: float, grid: int = 2 ** 18) -> float:
    """A lower bound on eps(delta) of the composition of runs (sigma, q, steps), from the remove
    direction (eps is the larger of the two directions', so this bounds it from below)."""
    active = _active(mechs)
    if isinstance(active, float):
        return active
    return _direction_bound(active, delta, "remove", grid, lower=True)


def epsilon_upper(sigma: float, q: float, steps: int, delta: float, grid: int = 2 ** 18) -> float:
    """An upper bound on eps(delta) of `steps` Poisson-subsampled Gaussian steps."""
    return composed_upper([(sigma, q, steps)], delta, grid)


def epsilon_lower(sigma: float, q: float, steps: int, delta: float, grid: int = 2 ** 18) -> float:
    """A lower bound on eps(delta) of `steps` Poisson-subsampled Gaussian steps."""
    return composed_lower([(sigma, q, steps)], delta, grid)


def epsilon_bracket(sigma: float, q: float, steps: int, delta: float,
                    grid: int = 2 ** 18) -> Bracket:
    """Both ends: the exact eps(delta) lies in [lower, upper] (up to float round-off)."""
    return Bracket(epsilon_lower(sigma, q, steps, delta, grid),
                   epsilon_upper(sigma, q, steps, delta, grid))
