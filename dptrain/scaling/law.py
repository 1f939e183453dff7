"""Fitted scaling laws L(M, T, sigma_bar[, B]): prediction, validity range, JSON save/load.

M is the parameter count (total or non-embedding, recorded in `params_key`), T the number of steps,
sigma_bar = sigma / B the noise-batch ratio and B the expected batch size, which the
"parametric-batch" and "ceiling" laws read (where noise is small a larger batch is also more data
per step). A
law knows the range of the data it was fitted on; predictions outside it still work but raise an
`ExtrapolationWarning`.
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.interpolate import LinearNDInterpolator, NearestNDInterpolator
from threadpoolctl import threadpool_limits

from dptrain.errors import UserError

FORMAT = "dptrain-scaling-law/1"
PARAMETRIC_NAMES = ("log_E", "log_A", "alpha", "log_B", "beta", "log_C", "gamma", "gamma2",
                    "center", "log_width", "gamma3", "beta_batch")
# What a law file written before these were fitted used: the squashing sigmoid of McKenna et al.
# (centre -8, width 1.6 in log sigma_bar), a noise term that does not decay with T, and a data term
# in steps alone.
FIXED_SQUASH = {"center": -8.0, "log_width": math.log(1.6), "gamma3": 0.0, "beta_batch": 0.0}


VALIDATION_BAR = 0.05  # holdout error a law must stay under to be shipped


class ExtrapolationWarning(UserWarning):
    """A law was queried outside the range of the runs it was fitted on."""


def squashed_noise(sigma_bar: np.ndarray, center: float = FIXED_SQUASH["center"],
                   log_width: float = FIXED_SQUASH["log_width"]) -> np.ndarray:
    """sigma_bar' = sigmoid((log sigma_bar - center) / width); 0 at sigma_bar = 0 (no noise)."""
    with np.errstate(divide="ignore", over="ignore"):
        z = (np.log(sigma_bar) - center) / math.exp(log_width)
        return 1.0 / (1.0 + np.exp(-z))


def calibrated_factors(calibration: dict, level: float = 0.9) -> tuple[float, float]:
    """(low, high) factors on a prediction for a `level` interval of a new run's loss.

    Each held-out cell's log residual r_c = mean over its k_c runs of log(measured / predicted by
    the law refitted without the cell) is one draw of the law's error at a configuration it has
    not seen, seed noise included but averaged over k_c runs; a new run has its own seed draw, so
    the cell is widened by the rest of the seed spread s: a normal of variance s^2 (1 - 1/k_c)
    in log-loss (nothing for a cell of one run). The interval is the central `level` of the
    mixture (1/n) sum_c N(r_c, s^2 (1 - 1/k_c)), with the level raised to level * (1 + 1/n) (the
    split-conformal correction for n calibration cells) and capped where the mixture's tails take
    over (with fewer than about 10 cells the interval spans the extreme residuals)."""
    from scipy.special import ndtr

    cells = calibration["cells"]
    r = np.array([c["log_residual"] for c in cells], dtype=float)
    k = np.array([max(1, len(c.get("runs", ()))) for c in cells], dtype=float)
    n = len(r)
    s = float(calibration.get("seed_spread") or 0.0)  # no seed pairs measured: residuals alone
    widen = np.maximum(s * np.sqrt(1 - 1 / k), 1e-9)
    level = min(level * (1 + 1 / n), 1 - 0.5 / n)
    out = []
    for target in ((1 - level) / 2, (1 + level) / 2):
        lo, hi = r.min() - 10 * widen.max(), r.max() + 10 * widen.max()
        for _ in range(100):  # bisection on the mixture's CDF: deterministic
            mid = 0.5 * (lo + hi)
            if ndtr((mid - r) / widen).mean() < target:
                lo = mid
            else:
                hi = mid
        out.append(math.exp(0.5 * (lo + hi)))
    return out[0], out[1]


@dataclass
class ScalingLaw:
    method: str
    params_key: str  # "total" or "nonembed": which parameter count M means
    # {"M": [lo, hi], "T": [lo, hi], "sigma_bar": [lo, hi], "batch": [lo, hi]} ("batch" only in
    # laws fitted since it was recorded)
    validity: dict[str, list[float]]
    # Per holdout rule ("0.2", "largest-model", "late", ...): errors of a fit without the held-out runs.
    holdout: dict = field(default_factory=dict)
    # Leave-one-cell-out residuals (a cell: one (M, sigma_bar, batch) configuration) and the seed
    # spread, behind the prediction interval (`fit.calibrate`); empty in files from before.
    calibration: dict = field(default_factory=dict)
    # {"mean_abs_rel_error", "max_abs_rel_error", ...} of the method refitted without each cell, and
    # without each model size.
    leave_one_cell_out: dict = field(default_factory=dict)
    leave_one_size_out: dict = field(default_factory=dict)
    # What the law was fitted on (corpus, tokenizer, sequence length, optimizer, ...): the file's
    # "fitted_on" record (`dptrain.scaling.provenance`), set by `load_law`; None in older files.
    fitted_on: dict | None = None
    # {rule: why} for the holdout rules the runs could not support (`fit.split_holdout`); empty in
    # files from before.
    skipped_holdouts: dict = field(default_factory=dict)

    def __post_init__(self):
        if "rule" in self.holdout:  # a law file of one rule, written before rules were keyed
            rule = self.holdout["rule"]
            self.holdout = {rule: {k: v for k, v in self.holdout.items() if k != "rule"}}

    def validated(self, bar: float = VALIDATION_BAR) -> bool:
        """Whether the law predicts, within `bar` mean relative error, the final loss of both a
        larger model (the "largest-model" holdout) and longer runs ("late" or "longest") than
        those it was fitted on: the test for a law the planner may ship."""
        longer = self.holdout.get("late") or self.holdout.get("longest")
        larger = self.holdout.get("largest-model")
        return bool(longer and larger and max(longer["mean_abs_rel_error"], larger["mean_abs_rel_error"]) < bar)

    def worst_holdout_error(self) -> float:
        """The largest mean relative error over the recorded holdout rules (inf with none)."""
        return max((h["mean_abs_rel_error"] for h in self.holdout.values()), default=math.inf)

    @property
    def reads_batch(self) -> bool:
        """Whether predictions depend on the batch size beyond sigma_bar."""
        return False

    def _coordinates(self, M, T, sigma_bar, batch) -> list[tuple[str, object]]:
        """The (axis, value) pairs a range check covers: the batch where the law reads it."""
        coords = [("M", M), ("T", T), ("sigma_bar", sigma_bar)]
        if self.reads_batch and "batch" in self.validity and batch is not None:
            coords.append(("batch", batch))
        return coords

    def in_range(self, M, T, sigma_bar, batch=None) -> np.ndarray:
        ok = np.ones(np.broadcast(M, T, sigma_bar).shape, dtype=bool)
        for name, value in self._coordinates(M, T, sigma_bar, batch):
            lo, hi = self.validity[name]
            ok &= (np.asarray(value) >= lo * (1 - 1e-9)) & (np.asarray(value) <= hi * (1 + 1e-9))
        return ok

    def outside_factors(self, M: float, T: float, sigma_bar: float, batch: float | None = None) -> dict[str, float]:
        """How far each coordinate lies outside the fitted range, as a factor: 1 inside, 3 when
        three times below the lowest or above the highest value fitted (inf for sigma_bar = 0
        against a range of noisy runs). The batch is checked where the law reads it."""
        factors = {}
        for name, value in self._coordinates(M, T, sigma_bar, batch):
            lo, hi = self.validity[name]
            value = float(value)
            below = lo / value if value > 0 else (math.inf if lo > 0 else 1.0)
            factors[name] = max(1.0, below, value / hi)
        return factors

    @property
    def interval_kind(self) -> str | None:
        """What `interval` rests on: "calibrated" (held-out cells and the seed spread),
        "bootstrap" (coefficient refits only, older files) or None."""
        return "calibrated" if self.calibration.get("cells") else None

    def interval(self, M: float, T: float, sigma_bar: float, batch: float | None = None,
                 level: float = 0.9) -> tuple | None:
        """A `level` interval of the loss a run at this point will measure: the prediction times
        the quantiles of the leave-one-cell-out residuals, each widened by the seed spread (see
        `calibrated_factors`); None for a law without a calibration."""
        if not self.calibration.get("cells"):
            return None
        lo, hi = calibrated_factors(self.calibration, level)
        pred = float(self.predict(M, T, sigma_bar, batch, warn=False))
        return pred * lo, pred * hi

    def predict(self, M, T, sigma_bar, batch=None, warn: bool = True) -> np.ndarray:
        """Predicted loss; `batch` (the expected batch size) is needed by a law that reads it."""
        if self.reads_batch and batch is None:
            raise ValueError(f"the {self.method} law depends on the batch size: pass batch")
        batch = 1.0 if batch is None else batch  # unread by a law that does not depend on it
        M, T, sigma_bar, batch = (np.asarray(x, dtype=float) for x in np.broadcast_arrays(M, T, sigma_bar, batch))
        if warn and not self.in_range(M, T, sigma_bar, batch).all():
            v = self.validity
            warnings.warn(
                f"{self.method} scaling law queried outside its fitted range "
                f"(M {v['M'][0]:.3g}..{v['M'][1]:.3g}, T {v['T'][0]:.3g}..{v['T'][1]:.3g}, "
                f"sigma_bar {v['sigma_bar'][0]:.3g}..{v['sigma_bar'][1]:.3g}): extrapolating",
                ExtrapolationWarning, stacklevel=2)
        return self._predict(M, T, sigma_bar, batch)

    def _predict(self, M, T, sigma_bar, batch) -> np.ndarray:
        raise NotImplementedError

    def to_dict(self) -> dict:
        extra = {k: getattr(self, k) for k in ("skipped_holdouts", "calibration", "leave_one_cell_out",
                                               "leave_one_size_out") if getattr(self, k)}
        return {"method": self.method, "params_key": self.params_key, "validity": self.validity,
                "holdout": self.holdout, **extra}


@dataclass
class ParametricLaw(ScalingLaw):
    """L = E + A/M^alpha + B/(T^beta b^beta_batch) + C * sigma_bar'^gamma / (M^gamma2 T^gamma3)
    (coefficients kept as logs), sigma_bar' = sigmoid((log sigma_bar - center) / width), b the
    expected batch size. McKenna et al.'s form has gamma3 = beta_batch = 0 (method "parametric");
    "parametric-decay" fits gamma3 >= 0, a noise cost that shrinks as training goes on (noise slows
    training more than it raises the loss it ends at); "parametric-batch" fits beta_batch >= 0, a
    data term that also falls with the batch (a larger batch is more data per step, which matters
    where the noise is small; where it is large, the noise term holds the loss up whatever the batch).

    `bootstrap`: the coefficients refitted on resamples of the runs (drawn with replacement), whose
    spread gives each prediction an interval: the uncertainty that comes from which runs were
    measured, not a seed-to-seed spread of a single run's loss."""
    params: dict[str, float] = field(default_factory=dict)
    bootstrap: list[dict[str, float]] = field(default_factory=list)
    # Where E came from: "noise-free runs" (fitted on sigma_bar = 0 runs alone, then held) or
    # "joint fit" (no noise-free runs: E is whatever fits the noisy runs best, poorly identified).
    irreducible_from: str = "joint fit"

    def __post_init__(self):
        super().__post_init__()
        self.params = {**FIXED_SQUASH, **self.params}
        self.bootstrap = [{**FIXED_SQUASH, **p} for p in self.bootstrap]

    @property
    def reads_batch(self) -> bool:
        return self.params["beta_batch"] != 0

    @property
    def interval_kind(self) -> str | None:
        return super().interval_kind or ("bootstrap" if self.bootstrap else None)

    def interval(self, M: float, T: float, sigma_bar: float, batch: float | None = None,
                 level: float = 0.9) -> tuple | None:
        """The calibrated interval (`ScalingLaw.interval`) where the law has one; else, in files
        from before calibration, the spread of the bootstrap refits' predictions (coefficients
        only: it leaves out run-to-run noise and the shape's own error, and covers too little)."""
        if self.calibration.get("cells"):
            return super().interval(M, T, sigma_bar, batch, level)
        if not self.bootstrap:
            return None
        batch = 1.0 if batch is None else batch
        preds = [type(self)(self.method, self.params_key, self.validity, params=p)._predict(
            *(np.asarray(x, dtype=float) for x in (M, T, sigma_bar, batch))) for p in self.bootstrap]
        lo, hi = np.quantile(np.asarray(preds, dtype=float), [(1 - level) / 2, (1 + level) / 2])
        return float(lo), float(hi)

    def log_terms(self, M, T, sigma_bar, batch=1.0) -> np.ndarray:
        p = self.params
        with np.errstate(divide="ignore"):
            log_s = np.log(squashed_noise(sigma_bar, p["center"], p["log_width"]))
        log_m, log_t, log_b = np.log(M), np.log(T), np.log(batch)
        return np.stack(np.broadcast_arrays(
            np.full_like(log_m, p["log_E"]),
            p["log_A"] - p["alpha"] * log_m,
            p["log_B"] - p["beta"] * log_t - p["beta_batch"] * log_b,
            p["log_C"] + p["gamma"] * log_s - p["gamma2"] * log_m - p["gamma3"] * log_t))

    def _predict(self, M, T, sigma_bar, batch) -> np.ndarray:
        return np.exp(self.log_terms(M, T, sigma_bar, batch)).sum(axis=0)

    def to_dict(self) -> dict:
        return {**super().to_dict(), "params": self.params, "irreducible_from": self.irreducible_from,
                **({"bootstrap": self.bootstrap} if self.bootstrap else {})}


CEILING_NAMES = ("log_E", "log_A", "alpha", "log_B", "beta", "beta_batch", "center", "log_width",
                 "gamma", "log_F", "log_G", "phi")


@dataclass
class CeilingLaw(ParametricLaw):
    """Noise moves the loss from the noise-free law towards a ceiling:

        L = (1 - s) * L_clean(M, T, b) + s * L_ceiling(T),   s = sigma_bar'^gamma in [0, 1]
        L_clean = E + A/M^alpha + B/(T^beta b^beta_batch),   L_ceiling = F + G/T^phi

    with sigma_bar' the sigmoid of `ParametricLaw`. The noise cost is then (L_ceiling - L_clean) * s:
    larger for a model that could learn more, and a noisy run of any size ends near the ceiling,
    as the CPU sweeps show (at sigma_bar 1.6e-2, 18K-1.7M parameters end within 0.3 nats of each
    other while their noise-free losses span 1.2 nats); in the paper's additive shape the noise
    cost cannot depend on how far a model is from the ceiling, only on a power of M."""

    def __post_init__(self):
        ScalingLaw.__post_init__(self)  # every coefficient is fitted: no defaults to fill in

    def _predict(self, M, T, sigma_bar, batch) -> np.ndarray:
        p = self.params
        with np.errstate(divide="ignore"):
            s = squashed_noise(sigma_bar, p["center"], p["log_width"]) ** p["gamma"]
        clean = (math.exp(p["log_E"]) + np.exp(p["log_A"] - p["alpha"] * np.log(M))
                 + np.exp(p["log_B"] - p["beta"] * np.log(T) - p["beta_batch"] * np.log(batch)))
        ceiling = math.exp(p["log_F"]) + np.exp(p["log_G"] - p["phi"] * np.log(T))
        return (1 - s) * clean + s * ceiling


@dataclass
class SemiParametricLaw(ScalingLaw):
    """Log-loss interpolated linearly over (log M, log T, log sigma_bar) between smoothed,
    monotone, T-extrapolated run curves."""
    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))  # log M, log T, log sb, log L

    def __post_init__(self):
        super().__post_init__()
        self.points = np.asarray(self.points, dtype=float)
        xyz, values = self.points[:, :3], self.points[:, 3]
        self._linear = LinearNDInterpolator(xyz, values, rescale=True)
        # The triangulation's barycentric transforms (computed on first use, one tiny LAPACK solve
        # per simplex) are computed here with one BLAS thread: thread hand-offs made them seconds
        # slower on a busy 2-core machine, for the same numbers.
        with threadpool_limits(1):
            self._linear.tri.transform  # a cached property: computed once and kept
        self._scale = xyz.std(axis=0) + 1e-12
        self._nearest = NearestNDInterpolator(xyz / self._scale, values)
        span = xyz.max(axis=0) - xyz.min(axis=0)
        self._box = (xyz.min(axis=0) + 1e-9 * span, xyz.max(axis=0) - 1e-9 * span)

    def _predict(self, M, T, sigma_bar, batch) -> np.ndarray:
        with np.errstate(divide="ignore"):
            xyz = np.stack([np.log(M), np.log(T), np.log(sigma_bar)], axis=-1).reshape(-1, 3)
        # beyond the data each coordinate is held at its edge (the loss stays flat), then any point
        # still off the triangulated hull takes its nearest neighbour's value
        xyz = np.clip(xyz, *self._box)
        log_loss = self._linear(xyz)
        outside = np.isnan(log_loss)
        if outside.any():
            log_loss[outside] = self._nearest(xyz[outside] / self._scale)
        return np.exp(log_loss).reshape(np.shape(M))

    def to_dict(self) -> dict:
        return {**super().to_dict(), "points": self.points.tolist()}


_KINDS = {"parametric": ParametricLaw, "parametric-decay": ParametricLaw, "parametric-batch": ParametricLaw,
          "ceiling": CeilingLaw, "semiparametric": SemiParametricLaw}


def law_from_dict(d: dict) -> ScalingLaw:
    return _KINDS[d["method"]](**d)


def save_laws(path: str | Path, laws: dict[str, ScalingLaw], default: str,
              fitted_on: dict | None = None, method_choice: dict | None = None) -> None:
    """Write the laws; `fitted_on` (`dptrain.scaling.provenance.fit_provenance`) records what they
    were fitted on, `method_choice` (`dptrain.scaling.fit.default_method`) how the default was
    chosen."""
    doc = {"format": FORMAT, "default": default,
           **({"method_choice": method_choice} if method_choice else {}),
           **({"fitted_on": fitted_on} if fitted_on is not None else {}),
           "laws": {k: v.to_dict() for k, v in laws.items()}}
    Path(path).write_text(json.dumps(doc, indent=1) + "\n")


def load_law(path: str | Path, method: str | None = None) -> ScalingLaw:
    """The law of `method` in a law JSON file (its default method when None)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
        if doc.get("format") != FORMAT:
            raise ValueError(f"format is {doc.get('format')!r}, expected {FORMAT!r}")
        method = method or doc["default"]
        if method not in doc["laws"]:
            raise ValueError(f"no {method!r} law (has {sorted(doc['laws'])})")
        law = law_from_dict(doc["laws"][method])
        law.fitted_on = doc.get("fitted_on")
        return law
    except FileNotFoundError:
        raise UserError(f"law file not found: {path}") from None
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path}: not a valid scaling-law file ({err})") from None
