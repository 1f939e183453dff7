"""Compute-optimal private training plans: enumerate (M, B, T) at fixed compute C = 6 M B S T,
calibrate sigma for each (B, T) with the accountant, predict the loss with a scaling law.

Given eps, delta and the data size N, sigma depends only on (B, T) (q = B / N). So the candidates
are a log grid of batch sizes B <= N times a log grid of step counts T, calibrated once per privacy
budget (vectorised RDP, cached) and reused for every compute budget: M = C / (6 B S T) follows.
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
               min_params: float = 1e5, max_params: float = 1e12) -> dict[str, np.ndarray]:
    """Every (M, B, T) on the grid with M in range that spends the compute or down to 1/100 of it
    (spending less is allowed: past saturation more compute would only hurt), with sigma and
    predicted loss."""
    spend = compute * 10.0 ** (-np.arange(9) / 4)
    c, b, t = np.meshgrid(spend, grid.batch_sizes, grid.steps, indexing="ij")
    sigma = np.broadcast_to(grid.sigma, c.shape)
    m = c / (6 * seq_len * b * t)
    ok = (m >= min_params) & (m <= max_params) & np.isfinite(sigma)
    m, b, t, sigma = m[ok], b[ok], t[ok], sigma[ok]
    loss = law.predict(m, t, sigma / b, b, warn=False) if m.size else np.zeros(0)
    return {"M": m, "B": b, "T": t, "sigma": sigma, "loss": loss}


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
    order = np.argsort(np.where(finite, c["loss"], np.inf))[:top]
    limits = {"batch": (grid.batch_sizes[0], grid.batch_sizes[-1]),
              "steps": (grid.steps[0], grid.steps[-1]),
              "params": (min_params, max_params)}
    plans = [_make_plan(c["M"][i], int(c["B"][i]), int(c["T"][i]), c["sigma"][i], c["loss"][i],
                        seq_len, configs) for i in order if finite[i]]
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
    return Plan(**{**asdict(p), "outside": outside,
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
    return f"predicted loss {p.loss:.4f}, {where}{interval}{edges}"


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
    from dptrain.scaling.provenance import known

    fitted_on = fitted_on or {}
    if isinstance(fitted_on.get("optimizer"), dict):
        o = fitted_on["optimizer"]
        cfg["optimizer"] = {"name": o["name"], "lr": o["lr"], "betas": list(o["betas"]),
                            "weight_decay": o["weight_decay"]}
    if isinstance(fitted_on.get("schedule"), dict):
        cfg["schedule"] = dict(fitted_on["schedule"])
    if known(fitted_on.get("clip_norm")):
        cfg["privacy"]["max_grad_norm"] = float(fitted_on["clip_norm"])
    if mechanism == "bandmf":  # σ and the bands are calibrated by the trainer for the budget
        del cfg["privacy"]["noise_multiplier"]
        cfg["privacy"]["mechanism"] = "bandmf"
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
    if mechanism == "bandmf":
        notes = [*notes, f"mechanism bandmf: the law was fitted on DP-SGD runs; the loss above is DP-SGD's, not "
                         "predicted for BandMF (docs/privacy.md has measured comparisons; its learning rate "
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
