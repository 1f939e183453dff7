"""DP-SGD's mechanism for one run, decided once: σ, C, q, the unit, truncation; and its arithmetic.

`plan_mechanism` turns a privacy config and the data's size into a frozen `Mechanism` (calibrating
σ to the budget or checking a given σ against it, lineage included), refusing impossible plans
with one line each. Every mode (one process, ddp, fsdp, sweeps, audits) trains with that object
and the three functions below, so the privacy arithmetic exists once:

- `clip_coefficients`: c_i = w_i min(1, C / ||g_i||), zero for a non-finite example;
- `add_gaussian_noise`: g += σC z, z ~ N(0, 1) element-wise (where the noise goes is the only thing
  a parallel layout decides: one process, rank 0 before the sum, or each shard its own slice);
- `Mechanism.privatize`: noise (where this process adds it) and the division by the EXPECTED batch.

What the ledger and journal record of a step is `Mechanism.step_run` and `Mechanism.journal_fields`.

Three kinds (`privacy.mechanism`): "dpsgd", independent noise at every step (Poisson sampling);
"bandmf", noise correlated across b steps by a banded strategy matrix with cyclic Poisson sampling
(dptrain.privacy.bandmf; b = 1 is DP-SGD); "blt", noise correlated by a buffered Toeplitz strategy,
the same cyclic sampling over P = N/B parts, accounted without amplification
(dptrain.privacy.blt). Only the noise source, the sampler and what the accountants see differ; the
clipping, the noise scale σC and the divisor B do not.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

from dptrain.errors import UserError
from dptrain.privacy.accounting import PrivacyLedger, StepRun, calibrate_noise, make_run
from dptrain.privacy.bandmf import BandedNoise, accounted, choose_bands, opens_round, optimize_coefficients
from dptrain.privacy.blt import (BLT, BLTNoise, RegeneratedNoise, choose_buffers, optimize_blt, parts_for, round_charge,
                                 sensitivity)
from dptrain.privacy.noise import NoiseSource
from dptrain.privacy.sampling import CyclicPoissonSampler, PoissonSampler, UnitSampler

UNITS = ("sequence", "document", "group")
Noise = Callable[..., torch.Tensor]  # noise(shape, device, dtype) -> i.i.d. N(0, 1)


@dataclass(frozen=True)
class Mechanism:
    """The Poisson-subsampled Gaussian mechanism of one run (σ = 0 only for noise-free sweeps)."""

    noise_multiplier: float        # σ
    max_grad_norm: float           # C
    expected_batch_size: int       # B: the divisor of every step, never the drawn size
    num_examples: int              # N: sequences, or units (documents, groups)
    unit: str = "sequence"
    sequences_per_unit: int = 1    # k: sequences a sampled unit contributes
    max_batch_size: int | None = None  # truncated Poisson: draws above it are cut (and accounted)
    bands: int = 1                 # b: BandMF's bands (1: DP-SGD), or BLT's parts P (its min-separation)
    coefficients: tuple[float, ...] = (1.0,)  # the banded Toeplitz C's first column, norm 1
    blt: BLT | None = None         # BLT's strategy (then bands counts its parts)

    def __post_init__(self):
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise UserError(f"max_grad_norm must be a positive finite number, got {self.max_grad_norm!r}")
        if self.unit not in UNITS:
            raise UserError(f"privacy unit must be one of {', '.join(UNITS)}, got {self.unit!r}")
        if self.sequences_per_unit < 1 or (self.unit == "sequence" and self.sequences_per_unit != 1):
            raise UserError("privacy.max_sequences_per_unit applies to privacy.unit document or group only")
        if not 0 < self.expected_batch_size <= self.num_examples:
            what = "sequences" if self.unit == "sequence" else f"{self.unit}s"
            raise UserError(f"privacy.expected_batch_size {self.expected_batch_size} exceeds the "
                            f"{self.num_examples} training {what}")
        if self.blt is None and (len(self.coefficients) != self.bands or not self.coefficients[0] > 0):
            raise UserError(f"a {self.bands}-band strategy needs {self.bands} coefficients with c_0 > 0")
        if abs(math.fsum(c * c for c in self.coefficients) - 1) > 1e-9:
            raise UserError("the strategy's columns must have norm 1: the accounting assumes sensitivity 1")
        if self.kind != "dpsgd" and self.max_batch_size is not None:
            raise UserError(f"privacy.max_batch_size (truncated Poisson) is not supported with privacy.mechanism {self.kind}")
        if self.bands * self.expected_batch_size > self.num_examples:
            raise UserError(f"privacy.bands {self.bands} × expected_batch_size {self.expected_batch_size} exceeds "
                            f"the {self.num_examples} training examples: each of the b parts must hold a batch")
        self.step_run(0)  # σ, q and the cap, validated where every step of the ledger is

    # ---- what it is -------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        if self.blt is not None:
            return "blt"
        return "dpsgd" if self.bands == 1 else "bandmf"

    @property
    def sampling_rate(self) -> float:
        """The rate the accountants see: B/N, or for BandMF q_b = b·B/N within the part whose turn it is."""
        return accounted(self.bands, self.expected_batch_size / self.num_examples, 0)[0]

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise added to the clipped sum: σC."""
        return self.noise_multiplier * self.max_grad_norm

    @property
    def truncation(self) -> dict:
        """Truncated Poisson is accounted with the dataset size and the cap; plain Poisson needs neither."""
        if self.max_batch_size is None:
            return {}
        return {"dataset_size": self.num_examples, "max_batch_size": self.max_batch_size}

    def expected_participations(self, steps: int) -> float:
        """How many of `steps` steps a unit is expected to join: q·T for DP-SGD, the rate within
        its part times its turns for BandMF and BLT (about the same)."""
        turns = -(-int(steps) // self.bands)
        return self.sampling_rate * turns

    def sensitivity(self, steps: int) -> float:
        """BLT: the min-separation sensitivity of C over the whole rounds `steps` steps touch."""
        return sensitivity(self.blt, self.bands, steps)

    def step_run(self, count: int = 1) -> StepRun:
        """`count` steps of this mechanism from its start, as the accountants compose them: one
        subsampled Gaussian per step, or per round of b steps for BandMF (⌈count / b⌉); for BLT one
        Gaussian (q = 1) at σ / sensitivity, what its rounds' charges compose to."""
        if self.blt is not None:
            return make_run(self.noise_multiplier / self.sensitivity(count) if count else 0.0, 1.0, int(count > 0))
        rate, rounds = accounted(self.bands, self.expected_batch_size / self.num_examples, count)
        return make_run(self.noise_multiplier, rate, rounds, **self.truncation)

    def run_of_step(self, step: int) -> StepRun:
        """What step `step` (1-based, from this run's start) adds to the ledger: a BandMF round is
        charged at its first step, so every prefix of the run is covered; so is a BLT round, as a
        Gaussian (q = 1) carrying the round's share of the sensitivity."""
        if self.blt is not None:
            return round_charge(self.blt, self.bands, self.noise_multiplier, step)
        return make_run(self.noise_multiplier, self.sampling_rate, int(opens_round(step, self.bands)),
                        **self.truncation)

    def journal_fields(self) -> dict:
        """What the journal records of every step of this mechanism (besides the draw and layout)."""
        t = self.truncation
        return {"noise_multiplier": self.noise_multiplier, "sampling_rate": self.sampling_rate,
                "dataset_size": t.get("dataset_size"), "max_batch_size": t.get("max_batch_size"),
                **({} if self.unit == "sequence" else
                   {"unit": self.unit, "max_sequences_per_unit": self.sequences_per_unit}),
                **({} if self.bands == 1 else {"bands": self.bands}),
                **({} if self.blt is None else {"blt": self.blt.state()})}

    # ---- what it does -----------------------------------------------------------------------
    def sampler(self, streams, secure: bool, unit_ranges=None):
        """The Poisson sampler this mechanism is accounted for: the same q, cap and unit, by
        construction (`unit_ranges`: first row and row count of every unit, for document/group)."""
        if unit_ranges is not None:
            return UnitSampler(*unit_ranges, self.expected_batch_size, self.sequences_per_unit, streams,
                               secure=secure, bands=self.bands)
        if self.bands > 1:
            return CyclicPoissonSampler(self.num_examples, self.expected_batch_size, self.bands, streams, secure=secure)
        return PoissonSampler(self.num_examples, self.expected_batch_size, streams,
                              max_batch_size=self.max_batch_size, secure=secure)

    def noise_source(self, streams, secure: bool):
        """i.i.d. N(0, 1) per step (DP-SGD), or its correlation C⁻¹z (BandMF keeps b-1 buffers, BLT d)."""
        source = NoiseSource(streams, secure=secure)
        if self.blt is not None:  # no buffer where C⁻¹ = I − λS and the streams can be replayed
            regenerate = self.blt.lag is not None and not secure
            return (RegeneratedNoise if regenerate else BLTNoise)(source, self.blt)
        return source if self.bands == 1 else BandedNoise(source, self.coefficients)

    @torch.no_grad()
    def privatize(self, sums: Sequence[torch.Tensor], noise: Noise | None) -> None:
        """Turn clipped sums into the private gradient in place: + σC z where this process adds
        the noise (`noise` None: another process adds it to the same sum), then / B."""
        if noise is not None:
            add_gaussian_noise(sums, self.noise_std, noise)
        for s in sums:
            s.div_(self.expected_batch_size)


def clip_coefficients(norms: torch.Tensor, weights: torch.Tensor | None, max_grad_norm: float):
    """(c, finite): c_i = w_i min(1, C / ||g_i||), and 0 where the gradient is not finite (the
    example then contributes nothing; the step is never skipped)."""
    weights = torch.ones_like(norms) if weights is None else weights.to(device=norms.device, dtype=norms.dtype)
    finite = torch.isfinite(norms)
    coef = torch.where(finite, weights * torch.clamp(max_grad_norm / norms, max=1.0),
                       torch.zeros((), dtype=norms.dtype, device=norms.device))
    return coef, finite


@torch.no_grad()
def add_gaussian_noise(tensors: Iterable[torch.Tensor], std: float, noise: Noise) -> None:
    """t += std * z, z ~ N(0, 1) i.i.d. from `noise`, for every tensor in order (one draw each)."""
    if not (math.isfinite(std) and std >= 0):
        raise UserError(f"noise standard deviation must be a finite number >= 0, got {std!r}")
    for t in tensors:
        z = noise(t.shape, t.device, t.dtype)
        if tuple(z.shape) != tuple(t.shape):
            raise RuntimeError(f"noise source returned shape {tuple(z.shape)} for {tuple(t.shape)}")
        t.add_(z, alpha=std)


@dataclass(frozen=True)
class Plan:
    """A planned mechanism and the ε it spends over the whole lineage, at the config's δ."""

    mechanism: Mechanism
    epsilon: float


def plan_mechanism(privacy, num_examples: int, micro_batch_size: int,
                   spent: PrivacyLedger | None = None, noise_free: bool = False) -> Plan:
    """The run's mechanism from its `privacy` config section (dptrain.train.config.PrivacyConfig).

    σ is calibrated to `target_epsilon` or taken from `noise_multiplier` and checked against the
    budget; a continuation's budget covers the steps its parent `spent` too. `noise_free`: σ = 0,
    for scaling-law sweeps on public data (ε is infinite, and the report says so).
    """
    p, spent = privacy, spent or PrivacyLedger()
    k = p.max_sequences_per_unit
    if p.unit != "sequence":
        if p.max_batch_size is not None:
            raise UserError(f"privacy.max_batch_size (truncated Poisson) is not supported with privacy.unit {p.unit}")
        if micro_batch_size % k:
            raise UserError(f"runtime.micro_batch_size {micro_batch_size} must be a multiple of "
                            f"privacy.max_sequences_per_unit {k}: a micro-batch holds whole units")
    what = "sequences" if p.unit == "sequence" else f"{p.unit}s"
    if p.delta >= 1 / num_examples:
        raise UserError(f"privacy.delta {p.delta:g} is not below 1/N = {1 / num_examples:.3g}: "
                        f"such a guarantee allows publishing one of the {what} whole")

    blt = None
    if p.mechanism == "blt":
        bands = parts_for(p.expected_batch_size / num_examples, p.steps)
        blt = optimize_blt(p.steps, bands, p.buffers) if p.buffers is not None else choose_buffers(p.steps, bands)
        coefficients = (1.0,)
    elif p.mechanism == "bandmf" and p.bands is None:
        if p.target_epsilon is None or noise_free:
            raise UserError("privacy.mechanism bandmf with privacy.noise_multiplier (or no noise) needs "
                            "privacy.bands: the bands are chosen for a target_epsilon")
        best = choose_bands(p.target_epsilon, p.delta, p.steps, num_examples, p.expected_batch_size)[0]
        bands, coefficients = best.bands, best.coefficients
    else:
        bands = p.bands if p.mechanism == "bandmf" else 1
        coefficients = optimize_coefficients(p.steps, bands)

    def mechanism(sigma: float) -> Mechanism:
        return Mechanism(sigma, p.max_grad_norm, p.expected_batch_size, num_examples, p.unit, k,
                         p.max_batch_size, bands, coefficients, blt)

    if noise_free:
        return Plan(mechanism(0.0), math.inf)
    probe = mechanism(1.0)  # validates B, N, the unit, the cap and the bands before any accounting
    sigma = p.noise_multiplier
    if sigma is None:
        if spent.steps:
            raise UserError(f"the weights already spent {spent.steps} steps on private data: give "
                            "privacy.noise_multiplier, and target_epsilon as the budget of the whole lineage")
        if blt is not None:  # one Gaussian at σ / sensitivity
            sigma = calibrate_noise(p.target_epsilon, p.delta, 1.0, 1, accountant=p.accountant) * probe.sensitivity(p.steps)
        else:
            sigma = calibrate_noise(p.target_epsilon, p.delta, probe.sampling_rate, probe.step_run(p.steps).count,
                                    accountant=p.accountant, **probe.truncation)
    planned = mechanism(sigma)
    ledger = PrivacyLedger()
    ledger.load_state_dict(spent.state_dict())
    ledger.add(planned.step_run(p.steps))
    eps = ledger.epsilon(p.delta, p.accountant)
    if p.target_epsilon is not None and eps > p.target_epsilon:
        lineage = f" after the {spent.steps} steps already spent" if spent.steps else ""
        raise UserError(f"the plan (σ={sigma:.4g}, q={planned.sampling_rate:.4g}, {p.steps} steps{lineage}"
                        f"{'' if bands == 1 else f', {bands} parts' if blt else f', {bands} bands'}) "
                        f"spends ε={eps:.4g} > privacy.target_epsilon {p.target_epsilon:g} at δ={p.delta:g}")
    return Plan(planned, eps)
