"""Compute-optimal private training plans: enumerate (M, B, T) at fixed compute C = 6 M B S T,
calibrate sigma for each (B, T) with the accountant, predict the loss with a scaling law.

Given eps, delta and the data size N, sigma depends only on (B, T) (q = B / N). So the candidates
are a log grid of batch sizes B <= N times a log grid of step counts T, calibrated once per privacy
budget (vectorised RDP, cached) and reused for every compute budget: M = C / (6 B S T) follows.
The best point of that grid is then refined on a grid four times finer around it.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import yaml

from dptrain.errors import UserError
from dptrain.scaling.law import ScalingLaw
from dptrain.scaling.noise import calibrate_rdp, confirm_pld

# The model configs ship inside the package (assets/model, a copy of the repository's
# configs/model, kept identical by a test) so an installed dptrain finds them; a checkout points
# written configs at the repository's copy, the one its users read.
PACKAGED_MODEL_CONFIGS = Path(__file__).resolve().parents[1] / "assets" / "model"
SOURCE_MODEL_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "model"
MODEL_CONFIG_DIR = SOURCE_MODEL_CONFIGS if SOURCE_MODEL_CONFIGS.is_dir() else PACKAGED_MODEL_CONFIGS
SHIPPED_LAW = Path(__file__).resolve().parents[1] / "assets" / "scaling_law.json"  # from a real sweep
SATURATION_GAIN = 0.01  # 10x more compute improving the loss by less than this: saturated
MAX_EXTRAPOLATION = 3.0  # a plan further outside the fitted range is refused unless allowed
MAX_STEPS = 10**7
PER_DECADE = 4  # the search grid's points per decade of B, T and compute spent
# The best grid point is refined on this many points per decade, one grid step either side: on
# the coarse grid alone near-ties 1.8x apart in M swap as epsilon moves (the shipped law's
# parametric-batch shape planned 3.6e4, 6.4e4, 3.6e4, 6.4e4 parameters at epsilon 4, 4.8, 5.7,
# 6.7 and C = 7.3e12, where the optimum rises 4.4e4 -> 5.0e4).
REFINE_PER_DECADE = 16


@dataclass(frozen=True)
class Plan:
    params: float  # M
    batch_size: int
    steps: int
    sigma: float
    sigma_bar: float
    loss: float  # predicted
    compute: float  # 6 M B S T
    tokens_per_param: float
    nearest_config: str  # closest shipped model config, by log parameter count
    nearest_params: int
    accountant: str = "rdp"
    # How far M, T and sigma_bar lie outside the law's fitted range (1 = inside).
    outside: dict[str, float] = field(default_factory=dict)
    # Bounds of the search this plan sits on ("batch max", "steps min", ...): the optimum may lie
    # beyond them.
    edges: tuple[str, ...] = ()
    interval: tuple[float, float] | None = None  # 90% interval of the loss a run will measure
    interval_kind: str | None = None  # "calibrated" (held-out cells, seed spread) or "bootstrap"
    seq_len: int = 0  # tokens per example the law is applied to (seq len x sequences per unit)
    # What the prediction assumes beyond the fitted runs, said in words (a batch the sweep never ran)
    assumes: tuple[str, ...] = ()

    @property
    def extrapolation(self) -> float:
        """The largest factor by which a coordinate lies outside the fitted range."""
        return max(self.outside.values(), default=1.0)


@dataclass(frozen=True)
class Grid:
    batch_sizes: np.ndarray
    steps: np.ndarray
    sigma: np.ndarray  # shape (len(batch_sizes), len(steps))


def log_grid(lo: float, hi: float, per_decade: int) -> np.ndarray:
    n = max(2, int(round(per_decade * math.log10(hi / lo))) + 1)
    return np.unique(np.round(np.geomspace(lo, hi, n)).astype(np.int64))


@functools.lru_cache(maxsize=32)
def noise_grid(epsilon: float, delta: float, data_size: int, min_batch: int = 16,
               min_steps: int = 10, max_steps: int = MAX_STEPS, per_decade: int = 4,
               max_batch: int | None = None) -> Grid:
    """sigma for every (B, T) on log grids (cached: planning at many compute budgets reuses it)."""
    if not (0 < epsilon < math.inf and 0 < delta < 1):
        raise UserError(f"need epsilon > 0 and 0 < delta < 1, got epsilon={epsilon}, delta={delta}")
    if data_size < min_batch:
        raise UserError(f"data size {data_size} is below the smallest batch size {min_batch}")
    max_batch = min(data_size, max_batch or data_size)
    if max_batch < min_batch or max_steps < min_steps:
        raise UserError(f"the largest batch ({max_batch}) and step count ({max_steps}) must be at "
                        f"least {min_batch} and {min_steps}")
    batches = log_grid(min_batch, max_batch, per_decade)
    steps = log_grid(min_steps, max_steps, per_decade)
    b, t = np.meshgrid(batches, steps, indexing="ij")
    sigma = calibrate_rdp(epsilon, delta, b / data_size, t).reshape(b.shape)
    sigma[sigma >= 0.999e6] = np.inf  # budget out of reach for this (B, T)
    return Grid(batches, steps, sigma)


def model_configs(directory: Path = MODEL_CONFIG_DIR, params_key: str = "total") -> dict[str, int]:
    from dptrain.model import DecoderConfig, parameter_counts

    key = "total" if params_key == "total" else "non_embedding"
    return {p.stem: parameter_counts(DecoderConfig.from_yaml(p))[key]
            for p in sorted(directory.glob("*.yaml"))}


def chinchilla_params(compute: float) -> float:
    """Non-private compute-optimal size by the Chinchilla rule: 20 tokens per parameter, C = 6 M D."""
    return math.sqrt(compute / 120)


def candidates(law: ScalingLaw, compute: float, grid: Grid, seq_len: int,
               min_params: float = 1e5, max_params: float = 1e12, spend=None) -> dict[str, np.ndarray]:
    """Every (M, B, T) on the grid with M in range that spends the compute or down to 1/100 of it
    (spending less is allowed: past saturation more compute would only hurt), with sigma and
    predicted loss. `spend`: the compute levels tried (default 9, a quarter decade apart)."""
    spend = compute * 10.0 ** (-np.arange(9) / PER_DECADE) if spend is None else np.asarray(spend, dtype=float)
    c, b, t = np.meshgrid(spend, grid.batch_sizes, grid.steps, indexing="ij")
    sigma = np.broadcast_to(grid.sigma, c.shape)
    m = c / (6 * seq_len * b * t)
    ok = (m >= min_params) & (m <= max_params) & np.isfinite(sigma)
    m, b, t, sigma = m[ok], b[ok], t[ok], sigma[ok]
    loss = law.predict(m, t, sigma / b, b, warn=False) if m.size else np.zeros(0)
    return {"M": m, "B": b, "T": t, "sigma": sigma, "loss": loss, "spend": c[ok]}


def _around(value: float, lo: float, hi: float, integer: bool = True) -> np.ndarray:
    """REFINE_PER_DECADE points per decade, one coarse grid step either side of `value`, in [lo, hi]."""
    k = REFINE_PER_DECADE // PER_DECADE
    points = np.clip(value * 10.0 ** (np.arange(-k, k + 1) / REFINE_PER_DECADE), lo, hi)
    return np.unique(np.round(points).astype(np.int64)) if integer else np.unique(points)


def _calibrate_near(epsilon: float, delta: float, q: np.ndarray, steps: np.ndarray, guess: np.ndarray,
                    within: float = 1.03, iters: int = 20) -> np.ndarray:
    """The RDP sigma of `calibrate_rdp` for pairs whose sigma is about `guess`, some 5x faster:
    bisection between guess / within and guess * within (20 halvings: 3e-8 apart) on the seven
    RDP orders around each pair's best order at the guess, instead of 32 halvings on all 40. Fewer
    orders can only over-state epsilon, so sigma still meets the budget; it is checked on every
    order, and a pair outside the bracket is calibrated in full."""
    from dptrain.scaling.noise import ORDERS, epsilon_rdp

    by_order = np.stack([epsilon_rdp(guess, q, steps, delta, orders=ORDERS[j:j + 1]) for j in range(len(ORDERS))])
    near = ORDERS[np.unique(np.clip(by_order.argmin(axis=0)[:, None] + np.arange(-3, 4), 0, len(ORDERS) - 1))]
    lo, hi = np.log(guess / within), np.log(guess * within)
    for _ in range(iters):
        mid = (lo + hi) / 2
        ok = epsilon_rdp(np.exp(mid), q, steps, delta, orders=near) <= epsilon
        lo, hi = np.where(ok, lo, mid), np.where(ok, mid, hi)
    sigma = np.exp(hi)
    # hi is never checked by the bisection, and a result at the bracket's bottom may lie below it
    off = (epsilon_rdp(sigma, q, steps, delta) > epsilon) | (sigma <= guess / within * (1 + 1e-6))
    if off.any():
        sigma[off] = calibrate_rdp(epsilon, delta, q[off], steps[off])
    return sigma


def refine(law: ScalingLaw, compute: float, best: dict, grid: Grid, budget: tuple, seq_len: int,
           min_params: float, max_params: float, exact: int = 4) -> dict:
    """The best (M, B, T) within one coarse grid step of `best` (one candidate, as scalars) on a
    grid REFINE_PER_DECADE per decade in B, T and the compute spent. Its sigma is interpolated
    (log-linearly in B and T) from the coarse grid to rank the points, then calibrated for the
    `exact` best of them, which decide: one calibration instead of one per point (the planner's
    plots call this dozens of times). Never worse than `best`, which is returned if nothing beats it."""
    from scipy.interpolate import RegularGridInterpolator

    epsilon, delta, data_size = budget
    batches = _around(float(best["B"]), grid.batch_sizes[0], grid.batch_sizes[-1])
    steps = _around(float(best["T"]), grid.steps[0], grid.steps[-1])
    b, t = np.meshgrid(batches, steps, indexing="ij")
    with np.errstate(invalid="ignore"):  # unreachable neighbours: inf, and no candidate there
        log_sigma = RegularGridInterpolator((np.log(grid.batch_sizes), np.log(grid.steps)), np.log(grid.sigma))
        guess = Grid(batches, steps, np.exp(log_sigma((np.log(b), np.log(t)))))
    spend = _around(float(best["spend"]), compute / 100, compute, integer=False)
    c = candidates(law, compute, guess, seq_len, min_params, max_params, spend=spend)
    loss = np.where(np.isfinite(c["loss"]), c["loss"], np.inf)
    top = [i for i in np.argsort(loss)[:exact] if np.isfinite(loss[i])]
    if not top:
        return best
    sigma = _calibrate_near(epsilon, delta, c["B"][top] / data_size, c["T"][top], c["sigma"][top])
    exact_loss = law.predict(c["M"][top], c["T"][top], sigma / c["B"][top], c["B"][top], warn=False)
    exact_loss = np.where((sigma < 0.999e6) & np.isfinite(exact_loss), exact_loss, np.inf)
    j = int(np.argmin(exact_loss))
    if not exact_loss[j] < best["loss"]:
        return best
    return {**{k: v[top[j]] for k, v in c.items()}, "sigma": sigma[j], "loss": exact_loss[j]}


def plan(law: ScalingLaw, compute: float, epsilon: float, delta: float, data_size: int,
         seq_len: int, top: int = 5, configs: dict[str, int] | None = None,
         max_steps: int = MAX_STEPS, max_batch: int | None = None, min_params: float | None = None,
         max_params: float = 1e12) -> list[Plan]:
    """The `top` configurations of lowest predicted loss, best first, each with how far it lies
    outside the law's fitted range and which search bounds it touches. Models below `min_params`
    (default: the smallest the law was fitted on) are not searched."""
    if compute <= 0 or seq_len <= 0:
        raise UserError("compute and sequence length must be positive")
    grid = noise_grid(float(epsilon), float(delta), int(data_size), max_steps=int(max_steps),
                      max_batch=None if max_batch is None else int(max_batch))
    min_params = law.validity["M"][0] if min_params is None else min_params
    c = candidates(law, compute, grid, seq_len, min_params, max_params)
    finite = np.isfinite(c["loss"])
    if not finite.any():
        raise UserError(why_nothing_fits(compute, grid, seq_len, epsilon, delta, data_size,
                                         min_params, max_params))
    configs = configs if configs is not None else model_configs(params_key=law.params_key)
    order = [i for i in np.argsort(np.where(finite, c["loss"], np.inf))[:top + 1] if finite[i]]
    limits = {"batch": (grid.batch_sizes[0], grid.batch_sizes[-1]),
              "steps": (grid.steps[0], grid.steps[-1]),
              "params": (min_params, max_params)}
    best = refine(law, compute, {k: v[order[0]] for k, v in c.items()}, grid,
                  (float(epsilon), float(delta), int(data_size)), seq_len, min_params, max_params)
    # the runners-up stay the coarse grid's, less one the refined best may have landed on
    rows = [best] + [{k: v[i] for k, v in c.items()} for i in order[1:]
                     if (c["B"][i], c["T"][i]) != (best["B"], best["T"]) or abs(c["M"][i] / best["M"] - 1) > 1e-9]
    plans = [_make_plan(r["M"], int(r["B"]), int(r["T"]), r["sigma"], r["loss"], seq_len, configs)
             for r in rows[:top]]
    return [_with_honesty(law, p, limits) for p in plans]


def why_nothing_fits(compute: float, grid: Grid, seq_len: int, epsilon: float, delta: float,
                     data_size: int, min_params: float, max_params: float) -> str:
    """One line naming what makes every (M, B, T) impossible: the budget, or the compute against
    the cheapest or the dearest plan searched (a plan may spend down to 1/100 of the compute)."""
    reachable = np.isfinite(grid.sigma)
    if not reachable.any():
        return (f"epsilon {epsilon:g} at delta {delta:g} is out of reach with {data_size:,} examples: "
                f"even a batch of {grid.batch_sizes[0]} for {grid.steps[0]} steps needs a noise "
                "multiplier above 1e6; raise epsilon or the data size")
    b, t = np.meshgrid(grid.batch_sizes, grid.steps, indexing="ij")
    cost = np.where(reachable, 6.0 * seq_len * b * t, np.nan)  # FLOPs per parameter
    i = np.unravel_index(np.nanargmin(cost), cost.shape)
    j = np.unravel_index(np.nanargmax(cost), cost.shape)
    cheapest, dearest = min_params * cost[i], max_params * cost[j]
    if compute < cheapest:
        return (f"compute {compute:.3g} FLOPs is below the cheapest plan searched: {int(t[i])} steps "
                f"of batch {int(b[i])} at seq len {seq_len} on {min_params:.3g} parameters (the "
                f"smallest model searched, --min-params) cost {cheapest:.3g}; give more compute or "
                "a smaller --min-params")
    if compute / 100 > dearest:
        return (f"compute {compute:.3g} FLOPs is more than 100x what the dearest plan searched can "
                f"spend ({dearest:.3g}: {int(t[j])} steps of batch {int(b[j])} at seq len {seq_len} on "
                f"{max_params:.3g} parameters, --max-params, --max-steps and the data size bound "
                "them); give less compute, or raise those bounds")
    return (f"no configuration fits compute {compute:.3g} with epsilon {epsilon:g} and {data_size:,} "
            f"examples between {min_params:.3g} and {max_params:.3g} parameters")


def _make_plan(m, b, t, sigma, loss, seq_len, configs, accountant="rdp") -> Plan:
    name, size = (min(configs.items(), key=lambda kv: abs(math.log(kv[1] / m))) if configs
                  else ("", 0))
    return Plan(float(m), b, t, float(sigma), float(sigma / b), float(loss),
                float(6 * m * b * seq_len * t), float(b * t * seq_len / m), name, int(size), accountant,
                seq_len=int(seq_len))


def _with_honesty(law: ScalingLaw, p: Plan, limits: dict | None = None) -> Plan:
    """`p` with its distance outside the fitted range, its interval and the bounds it touches."""
    edges = list(p.edges)
    for name, value in (("batch", p.batch_size), ("steps", p.steps), ("params", p.params)):
        lo, hi = (limits or {}).get(name, (None, None))
        # the step grid is log-spaced, a quarter decade apart: within a step of a bound is on it
        if lo is not None and value <= lo * 10 ** 0.25:
            edges.append(f"{name} min")
        if hi is not None and value >= hi / 10 ** 0.25:
            edges.append(f"{name} max")
    outside = law.outside_factors(p.params, p.steps, p.sigma_bar, p.batch_size)
    law_seq = (law.fitted_on or {}).get("seq_len")
    # another sequence length is outside the fitted range too. One token apart is the same length:
    # a sweep records the tokens predicted per sequence, one less than the prepared length.
    if isinstance(law_seq, int) and p.seq_len and abs(p.seq_len - law_seq) > 1:
        outside["seq_len"] = max(p.seq_len / law_seq, law_seq / p.seq_len)
    assumes = []
    batches = law.validity.get("batch")
    if not law.reads_batch and batches and not batches[0] <= p.batch_size <= batches[1]:
        # such a law reads the batch through sigma_bar only; more data per step also lowers the
        # loss where the noise is small (measured: docs/scaling.md, "Batch beyond sigma_bar")
        assumes.append(f"batch {p.batch_size} is outside the fitted batches ({batches[0]:g}..{batches[1]:g}): "
                       "the law assumes the batch acts through sigma_bar only")
    return Plan(**{**asdict(p), "outside": outside, "assumes": tuple(assumes),
                   "interval": law.interval(p.params, p.steps, p.sigma_bar, p.batch_size),
                   "interval_kind": law.interval_kind,
                   "edges": tuple(dict.fromkeys(edges))})


def describe_extrapolation(p: Plan) -> str:
    """One line: where the plan lies against the law's fitted range, and its interval."""
    far = [f"{name} {factor:.3g}x" for name, factor in p.outside.items() if factor > 1]
    where = ("outside the fitted range: " + ", ".join(far)) if far else "inside the fitted range"
    if p.interval and p.interval_kind == "bootstrap":
        interval = (f"; 90% bootstrap interval {p.interval[0]:.4f}..{p.interval[1]:.4f} (coefficients "
                    "only: no run-to-run noise, covers too little)")
    elif p.interval:
        interval = (f"; 90% interval {p.interval[0]:.4f}..{p.interval[1]:.4f} (held-out cells and seed "
                    "spread" + (", inside the fitted range only)" if far else ")"))
    else:
        interval = "; no prediction interval in this law"
    edges = f"; on the search bound: {', '.join(p.edges)}" if p.edges else ""
    assumes = "".join(f"; {a}" for a in p.assumes)
    return f"predicted loss {p.loss:.4f}, {where}{interval}{edges}{assumes}"


def replan_with_sigma(law: ScalingLaw, p: Plan, sigma: float, accountant: str) -> Plan:
    loss = float(law.predict(p.params, p.steps, sigma / p.batch_size, p.batch_size, warn=False))
    return _with_honesty(law, Plan(**{**asdict(p), "sigma": sigma, "sigma_bar": sigma / p.batch_size,
                                       "loss": loss, "accountant": accountant}))


def with_pld_sigma(law: ScalingLaw, p: Plan, epsilon: float, delta: float, data_size: int) -> Plan:
    """`p` with σ recalibrated by the certified PLD accountant, the one the trainer uses."""
    sigma = confirm_pld(epsilon, delta, p.batch_size / data_size, p.steps)
    return replan_with_sigma(law, p, sigma, "pld")


def best_loss(law: ScalingLaw, compute: float, epsilon: float, delta: float, data_size: int,
              seq_len: int, **bounds) -> float:
    return plan(law, compute, epsilon, delta, data_size, seq_len, top=1, configs={}, **bounds)[0].loss


def saturation(law, compute, epsilon, delta, data_size, seq_len, factors=(0.1, 1, 10, 100),
               **bounds) -> list[tuple[float, float, float]]:
    """(compute, best loss, relative gain over the previous budget) at compute x each factor;
    the best loss at a budget may spend less than all of it."""
    rows, previous = [], None
    for f in factors:
        try:
            loss = best_loss(law, compute * f, epsilon, delta, data_size, seq_len, **bounds)
        except UserError:
            continue
        gain = (previous - loss) / previous if previous else float("nan")
        rows.append((compute * f, loss, gain))
        previous = loss
    return rows


# A tighter epsilon planning a model larger by at most this factor is a tie, not a reversal: the
# refined grid's sizes are 10^(1/16) = 1.15x apart, and B and T are rounded to integers.
SHAPE_SLACK = 10 ** (1.5 / REFINE_PER_DECADE)


@dataclass(frozen=True)
class ShapeRow:
    epsilon: float
    params: float | None = None  # the planned M; None where no plan meets the budget
    batch_size: int = 0
    steps: int = 0
    sigma_bar: float = 0.0
    loss: float = math.nan
    edges: tuple[str, ...] = ()  # search bounds the optimum sits on
    outside: float = 1.0  # the plan's largest factor outside the law's fitted range
    error: str = ""

    @property
    def interior(self) -> bool:
        return self.params is not None and not self.edges


@dataclass(frozen=True)
class Shape:
    """Planned model size against epsilon at one compute budget, and whether a tighter epsilon
    ever plans a larger model (McKenna et al. 2025 find it plans a smaller or equal one)."""
    compute: float
    rows: tuple[ShapeRow, ...]  # tightest epsilon first
    # (tighter epsilon, looser epsilon, ratio of their planned M), interior optima only
    reversals: tuple[tuple[float, float, float], ...]

    @property
    def verdict(self) -> str:
        """"holds", "violated" or "untested" (fewer than two interior optima to compare)."""
        if self.reversals:
            return "violated"
        return "holds" if sum(r.interior for r in self.rows) >= 2 else "untested"

    def describe(self) -> str:
        """One line: the verdict and what it rests on."""
        inner = [r for r in self.rows if r.interior]
        if self.reversals:
            tight, loose, ratio = max(self.reversals, key=lambda v: v[2])
            return (f"violated: a tighter epsilon plans a larger model (eps {tight:g} plans {ratio:.2f}x the "
                    f"model of eps {loose:g}; {len(self.reversals)} such pairs among {len(inner)} interior optima)")
        if len(inner) >= 2:
            return (f"holds: over {len(inner)} interior optima (eps {inner[0].epsilon:g}..{inner[-1].epsilon:g}) "
                    f"a tighter epsilon never plans a larger model (ties within {SHAPE_SLACK:.2f}x)")
        bounds = sorted({e for r in self.rows for e in r.edges})
        return (f"untested: {len(inner)} of {len(self.rows)} optima are interior, too few to compare (the others "
                + (f"sit on a search bound: {', '.join(bounds)})" if bounds else "have no plan)"))

    def to_dict(self) -> dict:
        return {"compute": self.compute, "verdict": self.verdict, "summary": self.describe(),
                "rows": [{**asdict(r), "interior": r.interior} for r in self.rows],
                "reversals": [list(v) for v in self.reversals], "tie_factor": SHAPE_SLACK}


def epsilon_shape(law: ScalingLaw, compute: float, epsilons, delta: float, data_size: int,
                  seq_len: int, **search) -> Shape:
    """Plan at each epsilon with the same compute and search (`plan`'s grid and bounds; `search`:
    its max_steps, max_batch, min_params, max_params) and compare the planned model sizes. Only
    interior optima are compared: one on a search bound (the law's smallest fitted size, the
    batch or step limits) would move if the bound did. A tighter epsilon planning a model more
    than SHAPE_SLACK times larger is a reversal."""
    rows = []
    for eps in sorted(set(float(e) for e in epsilons)):
        try:
            p = plan(law, compute, eps, delta, data_size, seq_len, top=1, configs={}, **search)[0]
        except UserError as err:  # the budget is out of reach at this epsilon
            rows.append(ShapeRow(eps, error=str(err)))
            continue
        rows.append(ShapeRow(eps, p.params, p.batch_size, p.steps, p.sigma_bar, p.loss, p.edges, p.extrapolation))
    inner = [r for r in rows if r.interior]
    reversals = tuple((a.epsilon, b.epsilon, a.params / b.params) for i, a in enumerate(inner)
                      for b in inner[i + 1:] if a.params > b.params * SHAPE_SLACK)
    return Shape(float(compute), tuple(rows), reversals)


FIT_SHAPE_EPSILONS = (1.0, 2.0, 4.0, 8.0)
ASSUMED_DATA_SIZE = 100_000  # where the law does not record its corpus's size


def shape_in_range(law: ScalingLaw, budgets: int = 3) -> tuple[list[Shape], dict]:
    """`epsilon_shape` at `budgets` compute budgets spread over the law's per-run compute (its
    `fitted_on` record), for the law's own corpus size (else ASSUMED_DATA_SIZE) and sequence
    length, delta 1e-6 (0.1 / N where 1e-6 is not below 1 / N), epsilon in FIT_SHAPE_EPSILONS,
    steps up to 10x the longest fitted run (a shorter grid: it takes seconds). ([], {}) when the
    law records no compute. The setting is returned too."""
    fitted_on = law.fitted_on or {}
    per_run = (fitted_on.get("compute") or {}).get("per_run")
    if not per_run:
        return [], {}
    n = (fitted_on.get("corpus") or {}).get("train_sequences")
    setting = {"data_size": int(n) if isinstance(n, int) else ASSUMED_DATA_SIZE,
               "data_size_known": isinstance(n, int),
               "seq_len": int(fitted_on["seq_len"]) if isinstance(fitted_on.get("seq_len"), int) else 1024}
    setting["delta"] = 1e-6 if 1e-6 < 1 / setting["data_size"] else 0.1 / setting["data_size"]
    max_steps = max(10, int(10 * law.validity["T"][1]))
    shapes = [epsilon_shape(law, c, FIT_SHAPE_EPSILONS, setting["delta"], setting["data_size"],
                            setting["seq_len"], max_steps=max_steps)
              for c in np.unique(np.geomspace(per_run[0], per_run[1], budgets))]
    return shapes, setting


def check_planned_data(data_path: str | Path, data_size: int, seq_len: int, unit: str = "sequence") -> None:
    """UserError when an existing prepared folder is not the data the plan was made for (its
    training sequences, or its units when planned by document or group).

    A folder that does not exist yet is accepted: it is prepared after planning."""
    from dptrain.data.packed import PackedDataset

    if not (Path(data_path) / "manifest.json").is_file():
        if Path(data_path).exists():
            raise UserError(f"{data_path} is not a prepared data folder (no manifest.json)")
        return
    train = PackedDataset(Path(data_path), "train")
    if unit != "sequence":
        if train.unit != unit:
            raise UserError(f"{data_path} is packed by {train.unit}, but the plan is by {unit}: prepare it "
                            f"with `dptrain data prepare --unit {unit}`")
        units = len(train.unit_ranges()[0])
        if units != data_size or train.seq_len != seq_len:
            raise UserError(f"{data_path} holds {units:,} training {unit}s in sequences of {train.seq_len} "
                            f"tokens, but the plan is for --data-size {data_size:,} at --seq-len {seq_len}; "
                            "plan for the data you have")
        return
    if len(train) != data_size or train.seq_len != seq_len:
        raise UserError(f"{data_path} holds {len(train):,} training sequences of {train.seq_len} "
                        f"tokens, but the plan is for --data-size {data_size:,} at --seq-len "
                        f"{seq_len}; plan for the data you have")


def training_config(p: Plan, epsilon: float, delta: float, seq_len: int, data_path: str | Path,
                    base_dir: Path | None = None, unit: str = "sequence", sequences_per_unit: int = 1,
                    fitted_on: dict | None = None, mechanism: str = "dpsgd") -> dict:
    """A `dptrain train` config for a plan: the nearest shipped model config, the plan's batch,
    steps and sigma (rounded up, so the trainer's budget check at `target_epsilon` holds), the
    prepared data folder the plan's data size describes, and the optimizer, schedule and clip
    norm the law was fitted with (`fitted_on`, where it records them: the law holds for them only).

    The model path is relative to `base_dir` (the config file's folder; the trainer resolves it
    from there), absolute without one."""
    model = (MODEL_CONFIG_DIR / f"{p.nearest_config}.yaml").resolve()
    data = {"path": str(data_path), "source": "prepared"}
    cfg = {
        "model": os.path.relpath(model, base_dir) if base_dir is not None else str(model),
        "out_dir": f"runs/plan-{p.nearest_config}",
        "data": data,
        "privacy": {"target_epsilon": float(epsilon), "delta": float(delta),
                    "noise_multiplier": math.ceil(p.sigma * 1e6) / 1e6, "accountant": p.accountant,
                    "expected_batch_size": int(p.batch_size), "steps": int(p.steps)},
    }
    from dptrain.scaling.provenance import known, learning_rate_for

    fitted_on = fitted_on or {}
    if isinstance(fitted_on.get("optimizer"), dict):
        o = fitted_on["optimizer"]
        # the sweep's one rate, or, where it tried several, the best of the fitted cell nearest the plan
        cfg["optimizer"] = {"name": o["name"], "lr": learning_rate_for(fitted_on, p.params, p.sigma_bar),
                            "betas": list(o["betas"]), "weight_decay": o["weight_decay"]}
    if isinstance(fitted_on.get("schedule"), dict):
        cfg["schedule"] = dict(fitted_on["schedule"])
    if known(fitted_on.get("clip_norm")):
        cfg["privacy"]["max_grad_norm"] = float(fitted_on["clip_norm"])
    if mechanism in ("bandmf", "blt"):  # σ and the bands (buffers) are calibrated by the trainer for the budget
        del cfg["privacy"]["noise_multiplier"]
        cfg["privacy"]["mechanism"] = mechanism
    if unit != "sequence":  # micro-batches of whole units: a multiple of k rows, about 16
        k = int(sequences_per_unit)
        cfg["privacy"].update(unit=unit, max_sequences_per_unit=k)
        cfg["runtime"] = {"micro_batch_size": k * max(1, 16 // k)}
    return cfg


def write_training_config(path: str | Path, p: Plan, epsilon: float, delta: float, seq_len: int,
                          data_path: str | Path, unit: str = "sequence", sequences_per_unit: int = 1,
                          notes: list[str] = (), fitted_on: dict | None = None, mechanism: str = "dpsgd") -> None:
    path = Path(path)
    cfg = training_config(p, epsilon, delta, seq_len, data_path, base_dir=path.resolve().parent,
                          unit=unit, sequences_per_unit=sequences_per_unit, fitted_on=fitted_on,
                          mechanism=mechanism)
    if mechanism != "dpsgd":
        notes = [*notes, f"mechanism {mechanism}: the law was fitted on DP-SGD runs; the loss above is DP-SGD's, not "
                         f"predicted for {mechanism} (docs/privacy.md has measured comparisons; its learning rate "
                         "wants tuning)"]
    if "optimizer" in cfg or "schedule" in cfg:
        notes = [*notes, "optimizer, schedule and clip norm: those of the law's sweep (its predictions "
                         "hold for them only)"]
    else:
        notes = [*notes, "the law does not record its optimizer and schedule: the trainer's defaults "
                         "below may not be what it was fitted with"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# planned for {p.params:.3g} parameters (nearest config: {p.nearest_config})\n"
                    f"# {describe_extrapolation(p)}\n" + "".join(f"# {note}\n" for note in notes)
                    + yaml.safe_dump(cfg, sort_keys=False))
