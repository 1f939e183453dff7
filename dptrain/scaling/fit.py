"""Fit L(M, T, sigma_bar) to sweep results, two ways (McKenna et al. 2025), with a holdout check.

Semi-parametric: per run, rolling-mean smoothing, isotonic regression (non-increasing in T),
extrapolation in T with L = E + A / T^alpha; then isotonic regression across runs of one model size
(non-decreasing in sigma_bar) and linear interpolation of log-loss over (log M, log T, log sigma_bar).
Isotonic regression is scipy's (`scipy.optimize.isotonic_regression`, pool-adjacent-violators).

Parametric: L = E + A/M^alpha + B/T^beta + C * sigma_bar'^gamma / M^gamma2, Huber loss on log-loss
residuals, L-BFGS from a grid of starting points, best end point kept.
"""
from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
from scipy.optimize import curve_fit, isotonic_regression, minimize
from threadpoolctl import threadpool_limits
from dptrain.progress import progress_bar

from dptrain.errors import UserError
from dptrain.scaling.law import (PARAMETRIC_NAMES, ParametricLaw, ScalingLaw, SemiParametricLaw,
                                 squashed_noise)
from dptrain.scaling.results import RunResult

HUBER_DELTA = 1e-3


def validity_range(runs: list[RunResult], params_key: str) -> dict[str, list[float]]:
    ms = [r.params(params_key) for r in runs]
    first = [next((s for s, _ in r.eval_curve if s > 0), r.steps) for r in runs]
    sbs = [r.sigma_bar for r in runs]
    return {"M": [min(ms), max(ms)], "T": [max(1, min(first)), max(r.steps for r in runs)],
            "sigma_bar": [min(sbs), max(sbs)]}


def smooth_curve(run: RunResult, window: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Rolling mean then isotonic (non-increasing) fit of a run's eval curve; step 0 dropped."""
    steps = np.array([s for s, _ in run.eval_curve if s > 0], dtype=float)
    loss = np.array([l for s, l in run.eval_curve if s > 0], dtype=float)
    if len(steps) == 0:
        raise UserError(f"run {run.run_id}: eval curve has no point after step 0")
    w = min(window, len(loss))
    # centred rolling mean, shrinking at the ends so every point keeps its own step
    kernel = np.ones(w)
    rolled = np.convolve(loss, kernel, "same") / np.convolve(np.ones_like(loss), kernel, "same")
    return steps, isotonic_regression(rolled, increasing=False).x


def _power_law(t, e, a, alpha):
    return e + a * t ** (-alpha)


def extrapolator(steps: np.ndarray, loss: np.ndarray):
    """L(T) for any T >= steps[0]: the smoothed curve inside, E + A/T^alpha (fitted to the second
    half of the curve, shifted to join it) beyond the last step."""
    tail = steps >= steps[-1] / 2
    try:
        (e, a, alpha), _ = curve_fit(
            _power_law, steps[tail], loss[tail], p0=(loss[-1] * 0.9, loss[tail][0] * 0.1, 0.5),
            bounds=([0, 0, 0], [np.inf, np.inf, 3]), maxfev=5000)
    except (RuntimeError, ValueError, TypeError):  # too few or flat points: hold the last value
        e, a, alpha = loss[-1], 0.0, 0.0
    shift = loss[-1] - _power_law(steps[-1], e, a, alpha)

    def curve(t: np.ndarray) -> np.ndarray:
        t = np.asarray(t, dtype=float)
        inside = np.interp(np.log(t), np.log(steps), loss)
        return np.where(t <= steps[-1], inside, _power_law(t, e, a, alpha) + shift)
    return curve


def fit_semiparametric(runs: list[RunResult], params_key: str = "total",
                       extrapolate: float = 10.0, grid_points: int = 24) -> SemiParametricLaw:
    runs = [r for r in runs if r.sigma_bar > 0]
    ms = {r.params(params_key) for r in runs}
    sbs = {r.sigma_bar for r in runs}
    if len(ms) < 2 or len(sbs) < 2:
        raise UserError("the semi-parametric fit needs noisy runs (sigma > 0) of at least two model "
                        "sizes and two noise-batch ratios")
    curves = {}
    for run in runs:
        steps, loss = smooth_curve(run)
        curves[run.run_id] = (steps[0], extrapolator(steps, loss))
    lo = min(first for first, _ in curves.values())
    t_grid = np.geomspace(lo, extrapolate * max(r.steps for r in runs), grid_points)
    points = []
    for m in sorted(ms):
        group = [r for r in runs if r.params(params_key) == m]
        for t in t_grid:
            by_sb: dict[float, list[float]] = {}
            for r in group:
                first, curve = curves[r.run_id]
                if t >= first:
                    by_sb.setdefault(r.sigma_bar, []).append(float(curve(t)))
            if not by_sb:
                continue
            sb = np.array(sorted(by_sb))
            mean = np.array([np.mean(by_sb[s]) for s in sb])
            monotone = isotonic_regression(mean, increasing=True).x  # more noise, no lower loss
            points += [[math.log(m), math.log(t), math.log(s), math.log(l)] for s, l in zip(sb, monotone)]
    validity = validity_range(runs, params_key)
    try:
        return SemiParametricLaw("semiparametric", params_key, validity, points=np.array(points))
    except Exception as err:  # qhull: points degenerate (e.g. all in one plane)
        raise UserError(f"semi-parametric fit failed: runs do not span (M, T, sigma_bar) ({err})") from None


def _parametric_objective(theta, log_m, log_t, log_s, log_loss):
    t = np.stack([np.full_like(log_m, theta[0]), theta[1] - theta[2] * log_m,
                  theta[3] - theta[4] * log_t, theta[5] + theta[6] * log_s - theta[7] * log_m])
    top = t.max(axis=0)
    pred = top + np.log(np.exp(t - top).sum(axis=0))
    w = np.exp(t - pred)  # d pred / d t_k
    r = pred - log_loss
    huber = np.where(np.abs(r) <= HUBER_DELTA, 0.5 * r**2, HUBER_DELTA * (np.abs(r) - 0.5 * HUBER_DELTA))
    psi = np.clip(r, -HUBER_DELTA, HUBER_DELTA)
    w3_log_s = np.where(w[3] > 0, w[3] * np.where(np.isfinite(log_s), log_s, 0.0), 0.0)
    jac = np.stack([w[0], w[1], -w[1] * log_m, w[2], -w[2] * log_t, w[3], w3_log_s, -w[3] * log_m])
    return huber.sum(), jac @ psi


def parametric_points(runs: list[RunResult], params_key: str, min_fraction: float = 0.1):
    """(M, T, sigma_bar, loss) from every smoothed curve point past `min_fraction` of the run."""
    rows = []
    for run in runs:
        steps, loss = smooth_curve(run)
        keep = steps >= min_fraction * run.steps
        rows += [(run.params(params_key), s, run.sigma_bar, l) for s, l in zip(steps[keep], loss[keep])]
    return np.array(rows, dtype=float).T


def fit_parametric(runs: list[RunResult], params_key: str = "total") -> ParametricLaw:
    m, t, sb, loss = parametric_points(runs, params_key)
    if len(set(m)) < 2 or len(set(t)) < 2:
        raise UserError("the parametric fit needs runs of at least two model sizes and lengths")
    with np.errstate(divide="ignore"):
        data = (np.log(m), np.log(t), np.log(squashed_noise(sb)), np.log(loss))
    log_floor = math.log(loss.min())
    best = None
    grid = itertools.product([0.2, 0.5], [0.2, 0.5], [0.5, 1.5], [-0.3, 0.3], [0.0, 5.0])
    for alpha, beta, gamma, gamma2, log_c in grid:
        theta0 = np.array([log_floor - 0.5, 3.0, alpha, 3.0, beta, log_c, gamma, gamma2])
        # one BLAS thread: L-BFGS-B's tiny vector ops run many times slower with thread hand-offs
        with warnings.catch_warnings(), threadpool_limits(1):
            warnings.simplefilter("ignore", RuntimeWarning)
            res = minimize(_parametric_objective, theta0, args=data, jac=True, method="L-BFGS-B",
                           options={"maxiter": 2000})
        if np.isfinite(res.fun) and (best is None or res.fun < best.fun):
            best = res
    params = dict(zip(PARAMETRIC_NAMES, map(float, best.x)))
    return ParametricLaw("parametric", params_key, validity_range(runs, params_key), params=params)


FITTERS = {"parametric": fit_parametric, "semiparametric": fit_semiparametric}
BOOTSTRAP_RESAMPLES = 100


def bootstrap_parametric(runs: list[RunResult], params_key: str = "total",
                         resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> list[dict[str, float]]:
    """Parametric coefficients refitted on `resamples` draws of the runs with replacement (a draw
    with too few model sizes or lengths to fit is skipped)."""
    rng = np.random.default_rng(seed)
    fits = []
    for _ in progress_bar(range(resamples), desc="bootstrap", unit="fit", disable=None):
        draw = [runs[i] for i in rng.integers(0, len(runs), len(runs))]
        try:
            fits.append(fit_parametric(draw, params_key).params)
        except UserError:
            continue
    return fits


def split_holdout(runs: list[RunResult], rule: str, seed: int = 0) -> tuple[list, list]:
    """(train, held out) runs. `rule`: a fraction like "0.2" (random runs), "largest-model"
    (every run of the largest M) or "longest" (the runs with the most steps)."""
    if rule == "largest-model":
        top = max(r.params_total for r in runs)
        held = [r for r in runs if r.params_total == top]
    elif rule == "longest":
        top = max(r.steps for r in runs)
        held = [r for r in runs if r.steps == top]
    else:
        try:
            fraction = float(rule)
        except ValueError:
            raise UserError(f"--holdout {rule!r}: expected a fraction in (0, 1), 'largest-model' "
                            "or 'longest'") from None
        if not 0 < fraction < 1:
            raise UserError(f"--holdout {rule}: the fraction must be in (0, 1)")
        order = np.random.default_rng(seed).permutation(len(runs))
        held = [runs[i] for i in order[:max(1, round(fraction * len(runs)))]]
    ids = {r.run_id for r in held}
    train = [r for r in runs if r.run_id not in ids]
    if not train:
        raise UserError(f"--holdout {rule} holds out every run")
    return train, held


def holdout_error(law: ScalingLaw, held: list[RunResult]) -> dict:
    """Mean and max absolute relative error of the predicted final loss on held-out runs."""
    m = np.array([r.params(law.params_key) for r in held], dtype=float)
    pred = law.predict(m, [r.steps for r in held], [r.sigma_bar for r in held], warn=False)
    actual = np.array([r.final_loss() for r in held])
    rel = np.abs(pred - actual) / actual
    return {"runs": [r.run_id for r in held], "mean_abs_rel_error": float(rel.mean()),
            "max_abs_rel_error": float(rel.max())}


def fit_all(runs: list[RunResult], holdout: str | None = "0.2", params_key: str = "total",
            methods=tuple(FITTERS), bootstrap: int = BOOTSTRAP_RESAMPLES) -> dict[str, ScalingLaw]:
    """Each method fitted on all runs; its `holdout` entry gives the errors, on the held-out runs,
    of the same method fitted without them. The parametric law also gets `bootstrap` refits."""
    laws = {}
    for name in progress_bar(methods, desc="fitting", unit="method", disable=None):
        fitter = FITTERS[name]
        law = fitter(runs, params_key)
        if holdout:
            train, held = split_holdout(runs, holdout)
            law.holdout = {"rule": holdout, "fitted_on": "the other runs",
                           **holdout_error(fitter(train, params_key), held)}
        if name == "parametric" and bootstrap:
            law.bootstrap = bootstrap_parametric(runs, params_key, bootstrap)
        laws[name] = law
    return laws
