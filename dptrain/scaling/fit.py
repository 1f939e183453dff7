"""Fit L(M, T, sigma_bar) to sweep results, two ways (McKenna et al. 2025), with a holdout check.

Semi-parametric: per run, rolling-mean smoothing, isotonic regression (non-increasing in T),
extrapolation in T with L = E + A / T^alpha; then isotonic regression across runs of one model size
(non-decreasing in sigma_bar) and linear interpolation of log-loss over (log M, log T, log sigma_bar).
Isotonic regression is scipy's (`scipy.optimize.isotonic_regression`, pool-adjacent-violators).

Parametric: L = E + A/M^alpha + B/T^beta + C * sigma_bar'^gamma / M^gamma2 with
sigma_bar' = sigmoid((log sigma_bar - center) / width), centre and width fitted; Huber loss on
log-loss residuals, bounded L-BFGS from a grid of starting points, best end point kept. E comes from
the noise-free runs when the sweep has them. Two variants each free one more exponent:
"parametric-decay" a noise term that decays with T, "parametric-batch" a data term B/(T^beta
b^beta_batch) that falls with the batch size b too.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import warnings

import numpy as np
from scipy.optimize import curve_fit, isotonic_regression, minimize
from threadpoolctl import threadpool_limits

from dptrain.errors import UserError
from dptrain.progress import progress_bar
from dptrain.scaling.law import (CEILING_NAMES, PARAMETRIC_NAMES, CeilingLaw, ParametricLaw, ScalingLaw,
                                 SemiParametricLaw, calibrated_factors)
from dptrain.scaling.results import RunResult

HUBER_DELTA = 1e-3


def validity_range(runs: list[RunResult], params_key: str) -> dict[str, list[float]]:
    ms = [r.params(params_key) for r in runs]
    first = [next((s for s, _ in r.eval_curve if s > 0), r.steps) for r in runs]
    sbs = [r.sigma_bar for r in runs]
    bs = [r.batch_size for r in runs]
    return {"M": [min(ms), max(ms)], "T": [max(1, min(first)), max(r.steps for r in runs)],
            "sigma_bar": [min(sbs), max(sbs)], "batch": [min(bs), max(bs)]}


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


# Bounds of the parametric coefficients (PARAMETRIC_NAMES order). gamma and the sigmoid's width
# are bounded so that the noise term cannot turn into a step that switches off below some ratio
# (gamma = 12 with a fixed sigmoid did that: no noise cost at all below sigma_bar ~ 5e-4).
PARAMETRIC_BOUNDS = {"log_E": (-10.0, 5.0), "log_A": (-10.0, 30.0), "alpha": (0.0, 3.0),
                     "log_B": (-10.0, 30.0), "beta": (0.0, 3.0), "log_C": (-20.0, 20.0),
                     "gamma": (0.25, 4.0), "gamma2": (-2.0, 2.0),
                     "center": (math.log(1e-7), math.log(1.0)),
                     "log_width": (math.log(0.3), math.log(5.0)), "gamma3": (0.0, 2.0),
                     "beta_batch": (0.0, 1.0)}
# The exponents each variant frees (the others are held at 0).
FREED = {"parametric": (), "parametric-decay": ("gamma3",), "parametric-batch": ("beta_batch",)}


def _parametric_objective(theta, log_m, log_t, log_sb, log_batch, log_loss):
    """Huber loss of the predicted log-loss, and its gradient in theta (PARAMETRIC_NAMES order)."""
    log_e, log_a, alpha, log_b, beta, log_c, gamma, gamma2, center, log_width, gamma3, beta_batch = theta
    finite = np.isfinite(log_sb)  # sigma_bar = 0: no noise term at all
    z = np.where(finite, (np.where(finite, log_sb, 0.0) - center) / math.exp(log_width), -np.inf)
    log_s = -np.logaddexp(0.0, -z)  # log sigmoid(z); -inf where sigma_bar = 0
    t = np.stack([np.full_like(log_m, log_e), log_a - alpha * log_m,
                  log_b - beta * log_t - beta_batch * log_batch,
                  log_c + gamma * log_s - gamma2 * log_m - gamma3 * log_t])
    top = t.max(axis=0)
    pred = top + np.log(np.exp(t - top).sum(axis=0))
    w = np.exp(t - pred)  # d pred / d t_k; the noise term's weight is 0 where sigma_bar = 0
    r = pred - log_loss
    huber = np.where(np.abs(r) <= HUBER_DELTA, 0.5 * r**2, HUBER_DELTA * (np.abs(r) - 0.5 * HUBER_DELTA))
    psi = np.clip(r, -HUBER_DELTA, HUBER_DELTA)
    dlog_s_dz = np.where(finite, 1.0 / (1.0 + np.exp(np.where(finite, z, 0.0))), 0.0)  # sigmoid(-z)
    w3 = np.where(finite, w[3], 0.0)
    z0 = np.where(finite, z, 0.0)
    jac = np.stack([w[0], w[1], -w[1] * log_m, w[2], -w[2] * log_t, w3,
                    w3 * np.where(finite, log_s, 0.0), -w3 * log_m,
                    w3 * gamma * dlog_s_dz * (-1.0 / math.exp(log_width)),
                    w3 * gamma * dlog_s_dz * (-z0), -w3 * log_t, -w[2] * log_batch])
    return huber.sum(), jac @ psi


def parametric_points(runs: list[RunResult], params_key: str, min_fraction: float = 0.1):
    """(M, T, sigma_bar, batch, loss) from every smoothed curve point past `min_fraction` of the run."""
    rows = []
    for run in runs:
        steps, loss = smooth_curve(run)
        keep = steps >= min_fraction * run.steps
        rows += [(run.params(params_key), s, run.sigma_bar, run.batch_size, l)
                 for s, l in zip(steps[keep], loss[keep])]
    return np.array(rows, dtype=float).T


def _minimize(data, starts, bounds, objective=_parametric_objective) -> np.ndarray:
    """The best L-BFGS-B end point of `objective` over `starts`."""
    best = None
    for theta0 in starts:
        theta0 = np.clip(theta0, [lo for lo, _ in bounds], [hi for _, hi in bounds])
        # one BLAS thread: L-BFGS-B's tiny vector ops run many times slower with thread hand-offs
        with warnings.catch_warnings(), threadpool_limits(1):
            warnings.simplefilter("ignore", RuntimeWarning)
            res = minimize(objective, theta0, args=data, jac=True, method="L-BFGS-B",
                           bounds=bounds, options={"maxiter": 2000})
        if np.isfinite(res.fun) and (best is None or res.fun < best.fun):
            best = res
    return best.x


def fit_parametric(runs: list[RunResult], params_key: str = "total",
                   method: str = "parametric") -> ParametricLaw:
    """The parametric law of `method` (see FREED): McKenna et al.'s form, or with one more exponent
    fitted. With noise-free runs (sigma_bar = 0) among them, E, A, alpha, B and beta (and
    beta_batch) are first fitted on those alone, where the noise term is zero, and E is then held at
    that value while the rest is fitted on every run: the irreducible loss comes from runs that can
    measure it. Without noise-free runs everything is fitted jointly (`irreducible_from` says so)."""
    m, t, sb, batch, loss = parametric_points(runs, params_key)
    if len(set(m)) < 2 or len(set(t)) < 2:
        raise UserError("the parametric fit needs runs of at least two model sizes and lengths")
    with np.errstate(divide="ignore"):
        data = (np.log(m), np.log(t), np.log(sb), np.log(batch), np.log(loss))
    bounds = [PARAMETRIC_BOUNDS[name] for name in PARAMETRIC_NAMES]
    freed = set(FREED[method]) - ({"beta_batch"} if len(set(batch)) < 2 else set())  # one batch: unidentified
    for name in ("gamma3", "beta_batch"):
        if name not in freed:
            bounds[PARAMETRIC_NAMES.index(name)] = (0.0, 0.0)
    log_floor = math.log(loss.min())
    grid = list(itertools.product([0.2, 0.5], [0.2, 0.5], [0.5, 1.5], [-0.3, 0.3], [0.0, 5.0]))
    center0 = float(np.log(np.median(sb[sb > 0]))) if (sb > 0).any() else -8.0
    noise_free = sb == 0
    irreducible_from = "joint fit"
    if noise_free.any() and len(set(m[noise_free])) >= 2 and len(set(t[noise_free])) >= 2:
        clean = tuple(d[noise_free] for d in data)
        fixed_noise = [(-20.0, -20.0), (1.0, 1.0), (0.0, 0.0), (center0, center0), (0.0, 0.0), (0.0, 0.0)]
        starts = [np.array([log_floor - 0.5, 3.0, a, 3.0, b, -20.0, 1.0, 0.0, center0, 0.0, 0.0, 0.1])
                  for a, b in itertools.product([0.2, 0.5], [0.2, 0.5])]
        stage1 = _minimize(clean, starts, bounds[:5] + fixed_noise + bounds[-1:])
        bounds[0] = (float(stage1[0]), float(stage1[0]))
        log_floor = float(stage1[0]) + 0.5
        irreducible_from = "noise-free runs"
    starts = [np.array([log_floor - 0.5, 3.0, alpha, 3.0, beta, log_c, gamma, gamma2, center0, 0.0,
                        0.5, 0.1]) for alpha, beta, gamma, gamma2, log_c in grid]
    params = dict(zip(PARAMETRIC_NAMES, map(float, _minimize(data, starts, bounds))))
    return ParametricLaw(method, params_key, validity_range(runs, params_key), params=params,
                         irreducible_from=irreducible_from)


CEILING_BOUNDS = {**{k: v for k, v in PARAMETRIC_BOUNDS.items() if k in CEILING_NAMES},
                  "log_F": (-10.0, 5.0), "log_G": (-10.0, 10.0), "phi": (0.0, 3.0)}


def _ceiling_objective(theta, log_m, log_t, log_sb, log_batch, log_loss):
    """Huber loss of the ceiling law's log-loss, and its gradient in theta (CEILING_NAMES order)."""
    log_e, log_a, alpha, log_b, beta, beta_batch, center, log_width, gamma, log_f, log_g, phi = theta
    finite = np.isfinite(log_sb)
    width = math.exp(log_width)
    z = np.where(finite, (np.where(finite, log_sb, 0.0) - center) / width, 0.0)
    log_sig = -np.logaddexp(0.0, -z)
    s = np.where(finite, np.exp(gamma * log_sig), 0.0)  # 0 without noise
    e = math.exp(log_e)
    a = np.exp(log_a - alpha * log_m)
    d = np.exp(log_b - beta * log_t - beta_batch * log_batch)
    g = np.exp(log_g - phi * log_t)
    clean, ceiling = e + a + d, math.exp(log_f) + g
    pred = (1 - s) * clean + s * ceiling
    r = np.log(pred) - log_loss
    huber = np.where(np.abs(r) <= HUBER_DELTA, 0.5 * r**2, HUBER_DELTA * (np.abs(r) - 0.5 * HUBER_DELTA))
    psi = np.clip(r, -HUBER_DELTA, HUBER_DELTA) / pred  # d huber / d pred
    ds = (ceiling - clean) * s  # d pred / d log s
    dlog_s_dz = gamma / (1.0 + np.exp(z))  # gamma * sigmoid(-z)
    jac = np.stack([(1 - s) * e + 0 * log_m, (1 - s) * a, -(1 - s) * a * log_m, (1 - s) * d,
                    -(1 - s) * d * log_t, -(1 - s) * d * log_batch,
                    ds * dlog_s_dz * (-1.0 / width), ds * dlog_s_dz * (-z),
                    np.where(finite, ds * log_sig, 0.0),
                    s * math.exp(log_f), s * g, -s * g * log_t])
    return huber.sum(), jac @ psi


def fit_ceiling(runs: list[RunResult], params_key: str = "total") -> CeilingLaw:
    """The ceiling law (`CeilingLaw`). As for the parametric law, E (with A, alpha, B, beta and
    beta_batch) is first fitted on the noise-free runs when there are some, and E then held; the
    batch exponent is held at 0 when the runs share one batch size."""
    m, t, sb, batch, loss = parametric_points(runs, params_key)
    if len(set(m)) < 2 or len(set(t)) < 2 or not (sb > 0).any():
        raise UserError("the ceiling fit needs noisy runs and runs of at least two model sizes and lengths")
    with np.errstate(divide="ignore"):
        data = (np.log(m), np.log(t), np.log(sb), np.log(batch), np.log(loss))
    bounds = [CEILING_BOUNDS[name] for name in CEILING_NAMES]
    if len(set(batch)) < 2:
        bounds[CEILING_NAMES.index("beta_batch")] = (0.0, 0.0)
    center0 = float(np.log(np.median(sb[sb > 0])))
    log_top = float(np.log(loss.max()))
    noise_free = sb == 0
    irreducible_from = "joint fit"
    if noise_free.any() and len(set(m[noise_free])) >= 2 and len(set(t[noise_free])) >= 2:
        clean_data = tuple(x[noise_free] for x in data)
        starts = [np.array([log_top - 1.5, 3.0, a, 3.0, b, 0.05, center0, 0.0, 1.0, log_top, 0.0, 0.5])
                  for a, b in itertools.product([0.2, 0.5], [0.2, 0.5])]
        stage1 = _minimize(clean_data, starts, bounds, _ceiling_objective)  # s = 0: noise terms idle
        bounds[0] = (float(stage1[0]), float(stage1[0]))
        irreducible_from = "noise-free runs"
    starts = [np.array([log_top - 1.5, 3.0, alpha, 3.0, beta, 0.05, center0, 0.0, gamma, log_top - 0.5, log_g, 0.3])
              for alpha, beta, gamma, log_g in itertools.product([0.2, 0.5], [0.2, 0.5], [0.5, 1.5], [-2.0, 2.0])]
    params = dict(zip(CEILING_NAMES, map(float, _minimize(data, starts, bounds, _ceiling_objective))))
    return CeilingLaw("ceiling", params_key, validity_range(runs, params_key), params=params,
                      irreducible_from=irreducible_from)


FITTERS = {"parametric": fit_parametric,
           "parametric-decay": functools.partial(fit_parametric, method="parametric-decay"),
           "parametric-batch": functools.partial(fit_parametric, method="parametric-batch"),
           "ceiling": fit_ceiling,
           "semiparametric": fit_semiparametric}
BOOTSTRAP_RESAMPLES = 100


def bootstrap_parametric(runs: list[RunResult], params_key: str = "total",
                         resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                         fitter=fit_parametric) -> list[dict[str, float]]:
    """Coefficients of a parametric `fitter` refitted on `resamples` draws of the runs with
    replacement (a draw with too few model sizes or lengths to fit is skipped)."""
    rng = np.random.default_rng(seed)
    fits = []
    for _ in progress_bar(range(resamples), desc="bootstrap", unit="fit", disable=None):
        draw = [runs[i] for i in rng.integers(0, len(runs), len(runs))]
        try:
            fits.append(fitter(draw, params_key).params)
        except UserError:
            continue
    return fits


LATE_FRACTION = 0.5  # the "late" rule fits each run's first half and predicts its end


def truncated(run: RunResult, fraction: float) -> RunResult:
    """`run` as if it had stopped at `fraction` of its steps (its curve cut there). A true shorter
    run only when every evaluated step is an end point: a constant learning rate after warm-up."""
    cut = tuple(p for p in run.eval_curve if p[0] <= fraction * run.steps)
    if not any(step > 0 for step, _ in cut):
        raise UserError(f"run {run.run_id}: no eval point after step 0 in its first {fraction:g} "
                        "(the 'late' holdout needs several points per run)")
    return dataclasses.replace(run, eval_curve=cut, steps=cut[-1][0])


class UnsupportedHoldout(UserError):
    """A holdout rule these runs cannot support: it would hold out every run, or leave too little
    to fit (fewer than two model sizes, which every method needs), or cut a run to nothing."""


HOLDOUT_RULES = ("largest-model", "longest", "late")


def check_rule(rule: str) -> None:
    """UserError for a rule that is not one (misspelled, or a fraction outside (0, 1))."""
    if rule in HOLDOUT_RULES:
        return
    try:
        fraction = float(rule)
    except ValueError:
        raise UserError(f"--holdout {rule!r}: expected a fraction in (0, 1), 'largest-model', "
                        "'longest' or 'late'") from None
    if not 0 < fraction < 1:
        raise UserError(f"--holdout {rule}: the fraction must be in (0, 1)")


def size_name(n: float) -> str:
    """A parameter count as people write it: 40528 -> '40.5K'."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def split_holdout(runs: list[RunResult], rule: str, seed: int = 0) -> tuple[list, list]:
    """(runs to fit, runs whose final loss is predicted). `rule`: a fraction like "0.2" (random
    runs), "largest-model" (every run of the largest M), "longest" (the runs with the most steps) or
    "late" (every run fitted on its first half, predicted at its end: 2x further in T; valid for
    sweeps with a constant learning rate, where every evaluated step is an end point).
    A misspelled rule is a UserError; a rule these runs cannot support raises
    `UnsupportedHoldout`, whose message says why."""
    check_rule(rule)
    if rule == "late":
        short = [r.run_id for r in runs
                 if not any(0 < step <= LATE_FRACTION * r.steps for step, _ in r.eval_curve)]
        if short:
            raise UnsupportedHoldout(f"{len(short)} of {len(runs)} runs have no eval point after step 0 in "
                                     f"their first half ({', '.join(short[:3])}{', ...' if len(short) > 3 else ''})")
        return [truncated(r, LATE_FRACTION) for r in runs], list(runs)
    sizes = sorted({r.params_total for r in runs})
    if rule == "largest-model":
        if len(sizes) < 2:
            raise UnsupportedHoldout(f"the runs have one model size ({size_name(sizes[0])})")
        held = [r for r in runs if r.params_total == sizes[-1]]
    elif rule == "longest":
        lengths = sorted({r.steps for r in runs})
        if len(lengths) < 2:
            raise UnsupportedHoldout(f"the runs have one length ({lengths[0]} steps)")
        held = [r for r in runs if r.steps == lengths[-1]]
    else:
        order = np.random.default_rng(seed).permutation(len(runs))
        held = [runs[i] for i in order[:max(1, round(float(rule) * len(runs)))]]
    ids = {r.run_id for r in held}
    train = [r for r in runs if r.run_id not in ids]
    if not train:
        raise UnsupportedHoldout(f"it holds out all {len(runs)} runs")
    left = sorted({r.params_total for r in train})
    if len(left) < 2:  # every method needs two model sizes
        raise UnsupportedHoldout(f"the {len(train)} runs it leaves to fit have one model size "
                                 f"({size_name(left[0])}); every method needs two")
    return train, held


def holdout_error(law: ScalingLaw, held: list[RunResult]) -> dict:
    """Mean and max absolute relative error of the predicted final loss on held-out runs."""
    m = np.array([r.params(law.params_key) for r in held], dtype=float)
    pred = law.predict(m, [r.steps for r in held], [r.sigma_bar for r in held],
                       [r.batch_size for r in held], warn=False)
    actual = np.array([r.final_loss() for r in held])
    rel = np.abs(pred - actual) / actual
    return {"runs": [r.run_id for r in held], "mean_abs_rel_error": float(rel.mean()),
            "max_abs_rel_error": float(rel.max())}


def cell_of(run: RunResult, params_key: str = "total") -> tuple:
    """A run's cell: its (M, sigma_bar, batch) configuration (runs of a cell differ in seed or T)."""
    return (run.params(params_key), run.sigma_bar, run.batch_size)


def seed_spread(runs: list[RunResult]) -> dict:
    """Run-to-run spread of the final loss from runs that differ only in seed (same model, batch,
    sigma_bar and steps): the pooled standard deviation of log final loss within those groups
    ({"seed_spread": None} when no two runs differ only in seed)."""
    groups: dict[tuple, list[float]] = {}
    for r in runs:
        key = (r.params_total, r.params_nonembed, r.batch_size, r.sigma_bar, r.steps)
        groups.setdefault(key, []).append(math.log(r.final_loss()))
    pairs = [np.array(v) for v in groups.values() if len(v) >= 2]
    dof = sum(len(v) - 1 for v in pairs)
    if not dof:
        return {"seed_spread": None, "seed_groups": 0, "seed_runs": 0}
    pooled = math.sqrt(sum(float(((v - v.mean()) ** 2).sum()) for v in pairs) / dof)
    return {"seed_spread": pooled, "seed_groups": len(pairs), "seed_runs": sum(len(v) for v in pairs)}


def leave_out(runs: list[RunResult], fitter, params_key: str, key, desc: str = "") -> list[dict]:
    """For each group of runs sharing `key(run)`: the method refitted on every other run, its
    prediction of the group's final losses. A group whose removal leaves runs the method cannot
    fit is skipped (recorded with "skipped")."""
    groups: dict = {}
    for r in runs:
        groups.setdefault(key(r), []).append(r)
    out = []
    for group_key in progress_bar(sorted(groups), desc=desc or "leave-out", unit="fit", disable=None):
        held = groups[group_key]
        ids = {r.run_id for r in held}
        train = [r for r in runs if r.run_id not in ids]
        entry = {"group": list(group_key) if isinstance(group_key, tuple) else group_key,
                 "runs": [r.run_id for r in held]}
        try:
            if not train:
                raise UserError("no run left")
            law = fitter(train, params_key)
        except UserError as err:
            out.append({**entry, "skipped": str(err)})
            continue
        pred = law.predict(np.array([r.params(params_key) for r in held], dtype=float),
                           [r.steps for r in held], [r.sigma_bar for r in held],
                           [r.batch_size for r in held], warn=False)
        out.append({**entry, "predicted": [float(x) for x in pred],
                    "measured": [r.final_loss() for r in held]})
    return out


def _relative(group: dict) -> list[float]:
    """Absolute relative error of each predicted run of a leave-out group."""
    return [abs(p - m) / m for p, m in zip(group["predicted"], group["measured"])]


def _errors(groups: list[dict]) -> dict:
    """Mean and max absolute relative error over the runs of the groups that were predicted."""
    done = [g for g in groups if "predicted" in g]
    rel = np.array([abs(p - m) / m for g in done for p, m in zip(g["predicted"], g["measured"])])
    if not len(rel):
        return {"mean_abs_rel_error": None, "max_abs_rel_error": None, "groups": 0, "runs": 0,
                "skipped": [g["group"] for g in groups]}
    per_group = [float(np.mean([abs(p - m) / m for p, m in zip(g["predicted"], g["measured"])])) for g in done]
    return {"mean_abs_rel_error": float(rel.mean()), "max_abs_rel_error": float(rel.max()),
            "groups": len(done), "runs": int(len(rel)),
            "groups_above_2pct": float(np.mean(np.array(per_group) > 0.02)),
            "skipped": [g["group"] for g in groups if "predicted" not in g]}


CALIBRATION_LEVEL = 0.9


def calibrate(law: ScalingLaw, runs: list[RunResult], fitter, params_key: str = "total") -> ScalingLaw:
    """Fill in the law's leave-one-cell-out and leave-one-size-out errors and the calibration of
    its prediction interval: each cell's log residual from the law refitted without that cell,
    and the seed spread measured on runs that differ only in seed (`law.interval`)."""
    cells = leave_out(runs, fitter, params_key, lambda r: cell_of(r, params_key), f"{law.method}: cells")
    sizes = leave_out(runs, fitter, params_key, lambda r: r.params(params_key), f"{law.method}: sizes")
    cell_errors, size_errors = _errors(cells), _errors(sizes)
    law.leave_one_cell_out = {"rule": "each (M, sigma_bar, batch) cell predicted by a fit without it",
                              **cell_errors,
                              # per run, for the method choice (`choose_method`)
                              "by_cell": [{"cell": g["group"], "errors": _relative(g)} for g in cells
                                          if "predicted" in g]}
    law.leave_one_size_out = {
        "rule": "each model size predicted by a fit without it (the smallest and largest: extrapolation)",
        **size_errors,
        "by_size": {str(g["group"]): float(np.mean([abs(p - m) / m for p, m in zip(g["predicted"], g["measured"])]))
                    for g in sizes if "predicted" in g}}
    residuals = [{"cell": g["group"], "runs": g["runs"],
                  "log_residual": float(np.mean(np.log(np.array(g["measured"]) / np.array(g["predicted"]))))}
                 for g in cells if "predicted" in g]
    law.calibration = {"method": "leave-one-cell-out log residuals, each widened by the seed spread",
                       "level": CALIBRATION_LEVEL, **seed_spread(runs), "cells": residuals}
    if residuals:
        lo, hi = calibrated_factors(law.calibration, CALIBRATION_LEVEL)
        law.calibration["factors"] = [lo, hi]
    return law


def applicable_methods(runs: list[RunResult]) -> list[str]:
    """The methods the runs can inform: all but parametric-batch when they share one batch size."""
    one_batch = len({r.batch_size for r in runs}) < 2
    return [name for name in FITTERS if not (one_batch and name == "parametric-batch")]


def fit_all(runs: list[RunResult], holdout=("0.2",), params_key: str = "total",
            methods=None, bootstrap: int = BOOTSTRAP_RESAMPLES, calibration: bool = False) -> dict[str, ScalingLaw]:
    """Each method (default: every one the runs can inform; parametric-batch needs two batch
    sizes) fitted on all runs; its `holdout` entry gives, per rule in `holdout` (a rule or a
    sequence of them, see `split_holdout`), the errors on the held-out runs of the same method
    fitted without them. A rule the runs cannot support, or whose remaining runs a method cannot
    fit, is skipped and recorded with the reason in `skipped_holdouts`; a misspelled rule is a
    UserError before any fit. The parametric laws also get `bootstrap` refits. With
    `calibration`, every law also gets its leave-one-cell-out and leave-one-size-out errors and a
    calibrated prediction interval (`calibrate`: one refit per cell and per size)."""
    rules = [holdout] if isinstance(holdout, str) else list(holdout or ())
    for rule in rules:
        check_rule(rule)
    splits, unsupported = {}, {}
    for rule in rules:
        try:
            splits[rule] = split_holdout(runs, rule)
        except UnsupportedHoldout as why:
            unsupported[rule] = str(why)
    laws = {}
    methods = applicable_methods(runs) if methods is None else methods
    for name in progress_bar(methods, desc="fitting", unit="method", disable=None):
        fitter = FITTERS[name]
        law = fitter(runs, params_key)
        for rule in rules:
            if rule in unsupported:
                law.skipped_holdouts[rule] = unsupported[rule]
                continue
            train, held = splits[rule]
            try:
                without = fitter(train, params_key)
            except UserError as err:  # e.g. the runs left have noisy runs of one size only
                law.skipped_holdouts[rule] = f"the {len(train)} runs it leaves cannot be fitted: {err}"
                continue
            law.holdout[rule] = {"fitted_on": "the other runs" if rule != "late" else "each run's first half",
                                 **holdout_error(without, held)}
        if isinstance(law, ParametricLaw) and bootstrap:
            law.bootstrap = bootstrap_parametric(runs, params_key, bootstrap, fitter=fitter)
        if calibration:
            calibrate(law, runs, fitter, params_key)
        laws[name] = law
    return laws


def _cell_errors(law: ScalingLaw) -> dict[tuple, list[float]]:
    """{cell: leave-one-cell-out error of each of its runs}, from the law's calibration."""
    return {tuple(c["cell"]): c["errors"] for c in law.leave_one_cell_out.get("by_cell", ())}


def choose_method(laws: dict[str, ScalingLaw]) -> tuple[str | None, dict]:
    """The method of lowest leave-one-cell-out mean error, and an estimate of the error of
    choosing that way, by nesting: for each cell c, the method of lowest mean error on the other
    cells is chosen and scored on c. (None, {}) when no law has leave-one-cell-out errors.

    Methods are compared on the cells every one of them predicted; a mean is over runs, as in
    `leave_one_cell_out`. The nesting reuses the residuals `calibrate` computed, no extra fit:
    the choice for c never reads c's own error, but the other cells' errors come from fits that
    did see c (each left out one other cell). A strictly nested estimate would refit every method
    without c and each other cell, cells^2 fits per method. So the estimate removes the optimism
    of picking the best of several methods on the errors it is then quoted with, not the small
    one of c having been in the inner fits."""
    errors = {name: _cell_errors(law) for name, law in laws.items()}
    errors = {name: e for name, e in errors.items() if e}
    if not errors:
        return None, {}
    cells = sorted(set.intersection(*(set(e) for e in errors.values())))
    if not cells:
        return None, {}
    names = list(errors)  # fitting order: ties go to the earlier method
    total = {n: sum(sum(errors[n][c]) for c in cells) for n in names}
    count = sum(len(errors[names[0]][c]) for c in cells)
    per_method = {n: {"mean_abs_rel_error": total[n] / count,
                      "max_abs_rel_error": max(max(errors[n][c]) for c in cells)} for n in names}
    chosen = min(names, key=lambda n: total[n])
    nested, picked = [], {}
    for c in cells:
        k = len(errors[names[0]][c])
        if count == k:  # one cell: nothing to choose on
            break
        inner = min(names, key=lambda n: (total[n] - sum(errors[n][c])) / (count - k))
        picked[inner] = picked.get(inner, 0) + 1
        nested += errors[inner][c]
    record = {"rule": "leave-one-cell-out", "lowest": chosen, "cells": len(cells), "runs": count,
              "per_method": per_method}
    if nested:
        record["nested"] = {
            "mean_abs_rel_error": float(np.mean(nested)), "max_abs_rel_error": float(np.max(nested)),
            "inner_choices": picked,
            "what": "for each cell, the method of lowest leave-one-cell-out mean error on the other "
                    "cells, scored on that cell; the other cells' errors come from fits that saw it "
                    "(residuals reused, not refitted)"}
    return chosen, record


def default_method(laws: dict[str, ScalingLaw], given: str | None = None) -> tuple[str, dict]:
    """The method a law file names as its default, and how it was chosen (the file's
    "method_choice"): `given` where named, else the lowest leave-one-cell-out error
    (`choose_method`); without those errors (no calibration), the lowest worst holdout error, which
    is measured on the same holdouts it is then quoted with; with neither, the paper's form."""
    lowest, record = choose_method(laws)
    if given is not None:
        return given, {**record, "rule": "given (--default)", "chosen": given}
    if lowest is not None:
        return lowest, {**record, "chosen": lowest}
    measured = [name for name, law in laws.items() if law.holdout]
    if measured:
        name = min(measured, key=lambda k: laws[k].worst_holdout_error())
        return name, {"rule": "worst holdout rule", "chosen": name,
                      "note": "no leave-one-cell-out errors: chosen on the holdout errors it is quoted "
                              "with, so they flatter it"}
    name = "parametric" if "parametric" in laws else next(iter(laws))
    return name, {"rule": "none measured", "chosen": name,
                  "note": "no leave-one-cell-out or holdout errors: the paper's form where fitted"}
