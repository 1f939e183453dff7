"""Privacy accounting for DP-SGD with Poisson (optionally truncated) sampling and Gaussian noise.

Three accountants of the (epsilon, delta) of the Poisson-subsampled Gaussian mechanism under
add-or-remove-one adjacency:
- "pld" (the default, the figure reported as the guarantee): a certified upper bound, the
  privacy loss distribution discretized pessimistically (connect-the-dots) and composed with
  bounded numerical error (`dptrain.privacy.certified`); where RDP is smaller (millions of steps)
  RDP's bound, which is also valid.
- "rdp": Opacus's Renyi DP accountant. A valid but loose upper bound.
- "prv": Opacus's privacy random variable accountant: an estimate, shown only labelled as one.
`UPPER_BOUNDS` names the accountants whose value is a proven upper bound.

Truncated Poisson sampling (batches above a maximum size cut down to a random subset, as in
VaultGemma) is accounted only by "pld". Where truncation is rare, by coupling: the truncated run
differs from the untruncated one only if some step truncates, which happens with probability at
most p = sum over steps of P(Binomial(N + 1, q) > cap), so the untruncated eps at
delta - (1 + e^eps) p bounds it. Where truncation is frequent that bound is void and
dp_accounting's analysis of the truncated mechanism is used (never reported below the untruncated
certified bound). Opacus has no analysis of truncation: those accountants are not applicable.
"""
from __future__ import annotations

import functools
import math
import warnings
from dataclasses import asdict, dataclass
from typing import Iterable

from dptrain.errors import UserError

ACCOUNTANTS = ("pld", "rdp", "prv")
# Accountants whose value is a proven upper bound on epsilon; the others are estimates.
UPPER_BOUNDS = ("pld", "rdp")

# FFT size of the certified accountant's composition grid. 2^16 keeps a call under half a second
# and its bound within about 0.2% of a finer (2^18) bracket's upper end on the tested grid.
CERTIFIED_GRID = 2 ** 16
# RDP overstates epsilon by well under this factor where epsilon is a few units or more; a
# certified bound further below RDP than this is cross-checked (see _implausibly_low).
SUSPICIOUS_RDP_RATIO = 3.0
# The silent failure seen (huge privacy losses) was at sigma ~0.2; the referee's grid validates the
# certified bound from sigma 0.6 up, and agreement was checked by hand down to 0.25.
CROSS_CHECK_BELOW_SIGMA = 0.5
# Truncation is negligible once the chance that any step truncates, times (1 + e^eps), is at most
# this share of delta; from there on the bound no longer depends on the cap.
TRUNCATION_SHARE = 1e-3

# dp_accounting's PLD grid, used only for frequently truncated batches: width 1e-4, sized down to
# about 1e-5 of epsilon after a cheap pass at width 1e-2 when epsilon is large.
PLD_DISCRETIZATION = 1e-4
PLD_COARSE_DISCRETIZATION = 1e-2
PLD_RELATIVE_DISCRETIZATION = 1e-5


def is_upper_bound(accountant: str) -> bool:
    """Whether this accountant's epsilon is a proven upper bound (else: an estimate)."""
    return accountant in UPPER_BOUNDS


@dataclass(frozen=True)
class StepRun:
    """`count` consecutive steps with the same noise multiplier and sampling.

    `dataset_size` and `max_batch_size` are set for truncated Poisson sampling, unset otherwise.
    """

    noise_multiplier: float
    sampling_rate: float
    count: int
    dataset_size: int | None = None
    max_batch_size: int | None = None

    @property
    def truncated(self) -> bool:
        return self.max_batch_size is not None

    def same_mechanism(self, other: "StepRun") -> bool:
        return (self.noise_multiplier, self.sampling_rate, self.dataset_size, self.max_batch_size) == (
            other.noise_multiplier, other.sampling_rate, other.dataset_size, other.max_batch_size)


def make_run(noise_multiplier: float, sampling_rate: float, count: int,
             dataset_size: int | None = None, max_batch_size: int | None = None) -> StepRun:
    """A validated StepRun; UserError on impossible values."""
    if not math.isfinite(noise_multiplier) or noise_multiplier < 0:
        raise UserError(f"noise multiplier must be a finite number >= 0, got {noise_multiplier}")
    if not 0 <= sampling_rate <= 1:
        raise UserError(f"sampling rate must be in [0, 1], got {sampling_rate}")
    if int(count) != count or count < 0:
        raise UserError(f"number of steps must be an integer >= 0, got {count}")
    if (dataset_size is None) != (max_batch_size is None):
        raise UserError("truncated Poisson sampling needs both a dataset size and a max batch size")
    if max_batch_size is not None:
        if int(dataset_size) != dataset_size or dataset_size < 1:
            raise UserError(f"dataset size must be a positive integer, got {dataset_size}")
        if int(max_batch_size) != max_batch_size or max_batch_size < 1:
            raise UserError(f"max batch size must be a positive integer, got {max_batch_size}")
        if max_batch_size >= dataset_size:  # a batch can never exceed it: plain Poisson sampling
            dataset_size = max_batch_size = None
        else:
            dataset_size, max_batch_size = int(dataset_size), int(max_batch_size)
    return StepRun(float(noise_multiplier), float(sampling_rate), int(count), dataset_size,
                   max_batch_size)


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise UserError(f"delta must be in (0, 1), got {delta}")


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise UserError(f"unknown accountant {accountant!r}; choose one of {', '.join(ACCOUNTANTS)}")


def applicable_accountants(runs: Iterable[StepRun]) -> tuple[str, ...]:
    """Accountants able to bound these runs: only PLD once any run uses truncated sampling."""
    return ("pld",) if any(r.truncated for r in runs) else ACCOUNTANTS


def epsilon_of_runs(runs: Iterable[StepRun], delta: float, accountant: str = "pld", *,
                    grid: int = CERTIFIED_GRID) -> float:
    """Epsilon at `delta` of the composition of all runs (0 if nothing private happened).

    `grid`: cells of the certified PLD computation; a coarser grid is faster and still an upper
    bound, only a looser one."""
    _check_delta(delta)
    _check_accountant(accountant)
    runs = tuple(r for r in runs if r.count > 0 and r.sampling_rate > 0)
    if not runs:
        return 0.0
    return _epsilon(_merge_gaussians(runs), delta, accountant, grid)


def _merge_gaussians(runs: tuple[StepRun, ...]) -> tuple[StepRun, ...]:
    """Unsubsampled Gaussian releases (q = 1, not truncated) as one: n releases at σ_i compose to
    exactly the Gaussian at (Σ n_i / σ_i²)^(-1/2) (privacy losses of Gaussians add as Gaussians).
    BLT's rounds and re-released steps are such releases, each at its own σ."""
    plain = [r for r in runs if r.sampling_rate == 1 and not r.truncated and r.noise_multiplier > 0]
    if len(plain) < 2 and not (plain and plain[0].count > 1):
        return runs
    inverse = math.fsum(r.count / r.noise_multiplier ** 2 for r in plain)
    rest = tuple(r for r in runs if r not in plain)
    return (*rest, StepRun(1 / math.sqrt(inverse), 1.0, 1))


@functools.lru_cache(maxsize=256)
def _epsilon(runs: tuple[StepRun, ...], delta: float, accountant: str, grid: int) -> float:
    """epsilon_of_runs, remembered: a run plans, logs and reports the same ledger more than once
    (a truncated-Poisson epsilon takes seconds). Every argument is immutable."""
    runs = list(runs)
    if any(r.noise_multiplier == 0 for r in runs):
        return math.inf
    if accountant not in applicable_accountants(runs):
        raise UserError(f"the {accountant} accountant cannot account truncated Poisson sampling; "
                        "use pld")
    if accountant == "pld":
        return _pld_epsilon(runs, delta, grid)
    return _opacus_epsilon(runs, delta, accountant)


def _pld_epsilon(runs: list[StepRun], delta: float, grid: int = CERTIFIED_GRID) -> float:
    plain = [StepRun(r.noise_multiplier, r.sampling_rate, r.count) for r in runs]
    truncated = [r for r in runs if r.truncated]
    if not truncated:
        return _certified_epsilon(plain, delta, grid)
    p_truncate = sum(r.count * _truncation_probability(r) for r in truncated)
    eps = _coupled_epsilon(plain, delta, p_truncate, grid)
    if eps is not None:
        return eps
    # truncation is frequent: rely on dp_accounting's analysis of the truncated mechanism, never
    # below the bound for negligible truncation (so raising the cap never raises epsilon there)
    return max(_dp_accounting_epsilon(tuple(runs), delta),
               _certified_epsilon(plain, delta * (1 - TRUNCATION_SHARE), grid))


def _certified_epsilon(runs: list[StepRun], delta: float, grid: int = CERTIFIED_GRID) -> float:
    """Certified upper bound for untruncated runs: the smaller of the certified PLD bound and
    RDP (also an upper bound, and the tighter one for runs of millions of steps, where the PLD
    grid gets coarse, or far outside the range where the PLD computation works)."""
    from dptrain.privacy.certified import CertificationError, composed_upper

    rdp = _rdp_epsilon(runs, delta)
    try:
        certified = composed_upper([(r.noise_multiplier, r.sampling_rate, r.count) for r in runs],
                                   delta, grid=grid)
    except CertificationError:
        return _fallback(rdp, runs, delta)
    suspicious = (min(r.noise_multiplier for r in runs) < CROSS_CHECK_BELOW_SIGMA
                  and certified < rdp / SUSPICIOUS_RDP_RATIO)
    if suspicious and _implausibly_low(certified, runs, delta):
        return _fallback(rdp, runs, delta)  # the computation failed without saying so
    return min(rdp, certified)


def _fallback(rdp: float, runs: list[StepRun], delta: float) -> float:
    """RDP where the certified computation cannot be used: the integer-order bound, or Opacus's
    (fractional and larger orders), whichever is smaller; both are upper bounds."""
    return min(rdp, _opacus_epsilon(runs, delta, "rdp"))


def _implausibly_low(certified: float, runs: list[StepRun], delta: float) -> bool:
    """True when the certified bound lies far below dp_accounting's PLD on a coarse grid: at very
    small sigma (huge privacy losses) the FFT composition can fail silently (sigma 0.198, q 0.0225,
    200 steps gave 4.5 against a true epsilon near 160). Checked only at small sigma when the bound
    is already suspicious (below RDP / SUSPICIOUS_RDP_RATIO), so it costs nothing in the usual
    regimes. It
    only ever swaps the certified bound for RDP, also an upper bound, so it cannot make the result
    unsound; its slack (half, less 0.05) is far wider than the coarse grid's overstatement."""
    coarse = _pld_epsilon_at(runs, delta, PLD_COARSE_DISCRETIZATION)
    return certified < 0.5 * coarse - 0.05


def _rdp_epsilon(runs: list[StepRun], delta: float) -> float:
    """RDP bound at integer orders (exact RDP of the subsampled Gaussian there), numpy only."""
    import numpy as np

    from dptrain.privacy.rdp import ORDERS, rdp_poisson_gaussian

    rdp = sum(r.count * rdp_poisson_gaussian([r.sampling_rate], [r.noise_multiplier])[0]
              for r in runs)
    orders = ORDERS.astype(float)
    eps = rdp + np.log1p(-1 / orders) - (math.log(delta) + np.log(orders)) / (orders - 1)
    return max(float(np.min(eps)), 0.0)


def _truncation_probability(run: StepRun) -> float:
    """P(a step's Poisson batch exceeds the cap), for the larger of two neighbouring datasets."""
    from scipy.stats import binom

    return float(binom.sf(run.max_batch_size, run.dataset_size + 1, run.sampling_rate))


def _coupled_epsilon(plain: list[StepRun], delta: float, p_truncate: float,
                     grid: int = CERTIFIED_GRID) -> float | None:
    """An eps with eps_plain(delta - (1 + e^eps) p) <= eps, or None if truncation is too likely.

    For any event E: P_trunc(D)(E) <= P_plain(D)(E) + p <= e^eps P_plain(D')(E) + delta_plain + p
    <= e^eps P_trunc(D')(E) + delta_plain + (1 + e^eps) p.
    """
    eps = _certified_epsilon(plain, delta * (1 - TRUNCATION_SHARE), grid)
    if (1 + math.exp(min(eps, 700.0))) * p_truncate <= TRUNCATION_SHARE * delta:
        return eps  # negligible: the same bound for every cap beyond this point
    candidate = eps
    for _ in range(8):
        rest = delta - (1 + math.exp(min(candidate, 700.0))) * p_truncate
        if rest <= 0:
            return None
        needed = _certified_epsilon(plain, rest, grid)
        if needed <= candidate:
            return candidate
        candidate = needed * (1 + 1e-6)
    return None


@functools.lru_cache(maxsize=64)  # the same for every grid of the certified bound it is paired with
def _dp_accounting_epsilon(runs: tuple[StepRun, ...], delta: float) -> float:
    coarse = _pld_epsilon_at(runs, delta, PLD_COARSE_DISCRETIZATION)
    width = min(PLD_COARSE_DISCRETIZATION,
                max(PLD_DISCRETIZATION, coarse * PLD_RELATIVE_DISCRETIZATION))
    return coarse if width == PLD_COARSE_DISCRETIZATION else _pld_epsilon_at(runs, delta, width)


def _pld_epsilon_at(runs: list[StepRun], delta: float, discretization: float) -> float:
    import dp_accounting
    from dp_accounting.pld.pld_privacy_accountant import PLDAccountant

    acc = PLDAccountant(value_discretization_interval=discretization)
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


# Opacus's PRV grid grows with epsilon: at sigma 0.117, q 0.023, 800 steps (RDP epsilon 5000) it
# took over 13 GiB and the out-of-memory killer ended the run before its final checkpoint (1.6 GiB
# at RDP 1400; at RDP 2600 it returns inf). PRV is only an estimate, so above this RDP bound it is
# not computed at all.
PRV_MAX_EPSILON = 1000.0


class EstimateUnavailable(UserError):
    """An estimate-only accountant declined a ledger it cannot evaluate within memory."""


def _opacus_epsilon(runs: list[StepRun], delta: float, accountant: str) -> float:
    from opacus.accountants import PRVAccountant, RDPAccountant

    if accountant == "prv" and (rdp := _opacus_epsilon(runs, delta, "rdp")) > PRV_MAX_EPSILON:
        raise EstimateUnavailable(f"the PRV estimate is not computed above epsilon {PRV_MAX_EPSILON:g} "
                                  f"(RDP bound {rdp:.4g}): its grid would outgrow memory")

    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    acc.history = [(r.noise_multiplier, r.sampling_rate, r.count) for r in runs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns about its alpha grid; the bound stays valid
        return max(0.0, float(acc.get_epsilon(delta)))


def epsilon(noise_multiplier: float, sampling_rate: float, steps: int, delta: float,
            accountant: str = "pld", *, dataset_size: int | None = None,
            max_batch_size: int | None = None) -> float:
    """Epsilon at `delta` after `steps` Poisson-subsampled Gaussian steps.

    q = 0 or steps = 0 gives 0; sigma = 0 (with q > 0) gives inf. Passing `dataset_size` and
    `max_batch_size` accounts truncated Poisson sampling (PLD only).
    """
    run = make_run(noise_multiplier, sampling_rate, steps, dataset_size, max_batch_size)
    return epsilon_of_runs([run], delta, accountant)


def calibrate_noise(target_epsilon: float, delta: float, sampling_rate: float, steps: int,
                    accountant: str = "pld", max_sigma: float = 100.0, *,
                    min_sigma: float = 0.1, rtol: float = 1e-3,
                    dataset_size: int | None = None, max_batch_size: int | None = None) -> float:
    """The smallest noise multiplier (to relative precision `rtol`) whose epsilon <= target.

    Bisection on sigma that only ever returns the upper end of the bracket, a sigma whose epsilon
    was computed and found within the target; so the result never exceeds the budget under the
    chosen accountant. If even `min_sigma` meets the target, returns `min_sigma`.
    """
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise UserError(f"target epsilon must be a finite number > 0, got {target_epsilon}")
    _check_delta(delta)
    _check_accountant(accountant)
    if not 0 < sampling_rate <= 1:
        raise UserError(f"sampling rate must be in (0, 1], got {sampling_rate}")
    if int(steps) != steps or steps <= 0:
        raise UserError(f"number of steps must be a positive integer, got {steps}")
    if not 0 < min_sigma < max_sigma:
        raise UserError(f"need 0 < min_sigma < max_sigma, got {min_sigma} and {max_sigma}")

    def eps(sigma: float) -> float:
        return epsilon(sigma, sampling_rate, steps, delta, accountant,
                       dataset_size=dataset_size, max_batch_size=max_batch_size)

    # Bracket outwards from a first guess, the sigma a fast vectorised RDP bound calls for (the
    # tighter accountants need a little less), in steps of `factor`.
    from dptrain.privacy.rdp import calibrate_rdp

    guess = float(calibrate_rdp(target_epsilon, delta, [sampling_rate], [steps])[0])
    factor = 1.25
    lo, hi = None, None
    sigma = min(max(guess, min_sigma), max_sigma)
    while hi is None:
        if eps(sigma) <= target_epsilon:
            hi = sigma
        elif sigma >= max_sigma:
            raise UserError(f"no noise multiplier up to {max_sigma} reaches epsilon "
                            f"{target_epsilon} at delta {delta} with sampling rate "
                            f"{sampling_rate} over {steps} steps; use fewer steps, a smaller "
                            "sampling rate or a larger budget")
        else:
            lo, sigma = sigma, min(factor * sigma, max_sigma)
            factor *= 2
    factor = 1.25
    while lo is None:
        if hi <= min_sigma:
            return hi
        sigma = max(hi / factor, min_sigma)
        if eps(sigma) <= target_epsilon:
            hi = sigma
            factor *= 2
        else:
            lo = sigma
    while hi / lo - 1 > rtol:
        mid = math.sqrt(lo * hi)  # geometric midpoint: sigma spans orders of magnitude
        if eps(mid) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    return hi


class PrivacyLedger:
    """Every noisy step taken, run-length compressed, and the epsilon they add up to.

    The trainer records each step (an empty Poisson batch is still a step); the ledger is saved
    with checkpoints so a resumed run keeps accounting for what it already spent.
    """

    def __init__(self) -> None:
        self._runs: list[StepRun] = []

    def record(self, noise_multiplier: float, sampling_rate: float, *,
               dataset_size: int | None = None, max_batch_size: int | None = None,
               count: int = 1) -> None:
        run = make_run(noise_multiplier, sampling_rate, count, dataset_size, max_batch_size)
        if run.count == 0:
            return
        if self._runs and self._runs[-1].same_mechanism(run):
            last = self._runs[-1]
            self._runs[-1] = StepRun(last.noise_multiplier, last.sampling_rate,
                                     last.count + run.count, last.dataset_size, last.max_batch_size)
        else:
            self._runs.append(run)

    def add(self, run: StepRun) -> None:
        self.record(run.noise_multiplier, run.sampling_rate, dataset_size=run.dataset_size,
                    max_batch_size=run.max_batch_size, count=run.count)

    @property
    def runs(self) -> tuple[StepRun, ...]:
        return tuple(self._runs)

    def by_mechanism(self) -> dict[tuple, int]:
        """Steps per distinct mechanism (σ, q, truncation): what the composition depends on."""
        counts: dict[tuple, int] = {}
        for r in self._runs:
            key = (r.noise_multiplier, r.sampling_rate, r.dataset_size, r.max_batch_size)
            counts[key] = counts.get(key, 0) + r.count
        return counts

    @property
    def steps(self) -> int:
        return sum(r.count for r in self._runs)

    def epsilon(self, delta: float, accountant: str = "pld") -> float:
        return epsilon_of_runs(self._runs, delta, accountant)

    def epsilons(self, delta: float, estimates: bool = True) -> dict[str, float]:
        """Epsilon under every accountant that can bound this ledger (an estimate that declines
        the ledger, PRV at a very large epsilon, is left out); `estimates=False` keeps only the
        upper bounds."""
        out = {}
        for accountant in applicable_accountants(self._runs):
            if not estimates and not is_upper_bound(accountant):
                continue
            try:
                out[accountant] = self.epsilon(delta, accountant)
            except EstimateUnavailable:
                continue
        return out

    def projected_epsilon(self, delta: float, noise_multiplier: float, sampling_rate: float,
                          steps: int, *, dataset_size: int | None = None,
                          max_batch_size: int | None = None, accountant: str = "pld") -> float:
        """Epsilon after the recorded steps plus `steps` more planned ones."""
        planned = make_run(noise_multiplier, sampling_rate, steps, dataset_size, max_batch_size)
        return epsilon_of_runs([*self._runs, planned], delta, accountant)

    def check_budget(self, target_epsilon: float, delta: float, noise_multiplier: float,
                     sampling_rate: float, steps: int, *, dataset_size: int | None = None,
                     max_batch_size: int | None = None, accountant: str = "pld") -> float:
        """Refuse (UserError) a planned continuation that would spend more than the budget.

        Returns the projected epsilon when it fits.
        """
        projected = self.projected_epsilon(delta, noise_multiplier, sampling_rate, steps,
                                           dataset_size=dataset_size,
                                           max_batch_size=max_batch_size, accountant=accountant)
        if projected > target_epsilon:
            raise UserError(f"the planned run would reach epsilon {projected:.4f} at delta {delta} "
                            f"({accountant}), over the budget of {target_epsilon}")
        return projected

    def state_dict(self) -> dict:
        return {"runs": [asdict(r) for r in self._runs]}

    def load_state_dict(self, state: dict) -> None:
        try:
            runs = [make_run(r["noise_multiplier"], r["sampling_rate"], r["count"],
                             r.get("dataset_size"), r.get("max_batch_size"))
                    for r in state["runs"]]
        except (KeyError, TypeError) as e:
            raise UserError(f"corrupt privacy ledger: {e!r}") from None
        self._runs = []
        for r in runs:
            self.record(r.noise_multiplier, r.sampling_rate, dataset_size=r.dataset_size,
                        max_batch_size=r.max_batch_size, count=r.count)
