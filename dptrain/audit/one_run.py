"""Privacy auditing in one training run (Steinke, Nasr, Jagielski, NeurIPS 2023, arXiv 2305.08846).

m canaries are each put into the training set by an independent fair coin. After training, every
canary gets a score (higher = "looks trained on"). The auditor guesses "included" for the k+
highest scores and "excluded" for the k- lowest, and abstains on the rest. If the training run is
(eps, delta)-DP, the number of correct guesses V among r guesses is stochastically dominated by
Binomial(r, e^eps / (1 + e^eps)), up to a delta term (the paper's Theorem 3 / Proposition 5.2).
So the p-value of the claim "the run is (eps, delta)-DP" is

    p(eps) = P[W >= v] + 2 m delta * max_{1<=i<=v} (1/i) * P[v - i <= W < v],  W ~ Bin(r, q(eps)),

and the largest eps with p(eps) <= significance is a lower bound on the run's true epsilon that is
wrong with probability at most `significance`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
from scipy.optimize import brentq
from scipy.special import expit
from scipy.stats import binom

from dptrain.errors import UserError


@dataclass
class OneRunAudit:
    """One audit's outcome; `asdict(...)` / `to_dict()` embeds it in a privacy report."""
    epsilon: float          # the lower bound (0 when the claim eps = 0 cannot be rejected)
    num_canaries: int       # m
    num_guesses: int        # r = k_pos + k_neg
    num_correct: int        # v
    k_pos: int
    k_neg: int
    delta: float
    significance: float     # the level asked for
    num_hypotheses: int     # how many (k_pos, k_neg) were tried; each was tested at significance / this
    ceiling: float = field(init=False)  # the most these m canaries could certify (all guessed right)

    def __post_init__(self):
        self.ceiling = max_certifiable_epsilon(self.num_canaries, self.significance)

    def to_dict(self) -> dict:
        return asdict(self)


def p_value(m: int, guesses: int, correct: int, eps: float, delta: float) -> float:
    """P-value of "(eps, delta)-DP" after `correct` right guesses out of `guesses` among m canaries."""
    q = float(expit(eps))
    beta = float(binom.sf(correct - 1, guesses, q))  # P[W >= correct]
    if delta == 0 or correct == 0:
        return min(beta, 1.0)
    # alpha = max_i mean of P[W = correct - j] over j = 1..i: the paper's delta correction.
    below = binom.pmf(np.arange(correct - 1, -1, -1), guesses, q)
    alpha = float(np.max(np.cumsum(below) / np.arange(1, correct + 1)))
    return min(beta + 2 * m * delta * alpha, 1.0)


def epsilon_from_counts(m: int, guesses: int, correct: int, delta: float, significance: float) -> float:
    """Largest eps whose (eps, delta) claim is rejected at `significance`; 0 if even eps = 0 is not."""
    if guesses == 0 or correct == 0:
        return 0.0

    def margin(eps: float) -> float:  # > 0 while the claim is rejected
        return significance - p_value(m, guesses, correct, eps, delta)

    if margin(0.0) <= 0:
        return 0.0
    lo, hi = 0.0, 1.0
    while margin(hi) > 0:  # p -> 1 as eps grows (q -> 1), so this ends
        lo, hi = hi, 2 * hi
    return float(brentq(margin, lo, hi, xtol=1e-9))


def max_certifiable_epsilon(m: int, significance: float = 0.05) -> float:
    """The ceiling of any one-run bound from m canaries: all m guessed, all right, delta = 0.

    q^m = significance, so eps = logit(significance^(1/m)); about 6.2 for m = 1000 at 0.05.
    """
    q = significance ** (1.0 / m)
    return float(np.log(q) - np.log1p(-q))


def _check(scores, included, significance: float, delta: float) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).ravel()
    included = np.asarray(included).ravel()
    if included.dtype != bool:
        if not np.isin(included, (0, 1)).all():
            raise UserError("included must hold booleans (or 0/1), one per canary")
        included = included.astype(bool)
    if scores.shape != included.shape:
        raise UserError(f"got {scores.size} scores but {included.size} inclusion flags")
    if scores.size == 0:
        raise UserError("an audit needs at least one canary")
    if not np.isfinite(scores).all():
        raise UserError("canary scores must be finite (found NaN or inf)")
    if not 0 < significance < 0.5:
        raise UserError(f"significance must be in (0, 0.5), got {significance}")
    if not 0 <= delta < 1:
        raise UserError(f"delta must be in [0, 1), got {delta}")
    return scores, included


def _ranked(scores: np.ndarray, included: np.ndarray) -> np.ndarray:
    """Inclusion flags ordered by score, highest first; ties keep canary order (fixed before coins)."""
    return included[np.argsort(-scores, kind="stable")]


def _counts(ranked: np.ndarray, k_pos: int, k_neg: int) -> tuple[int, int]:
    m = ranked.size
    if k_pos < 0 or k_neg < 0 or k_pos + k_neg > m:
        raise UserError(f"need 0 <= k_pos, k_neg and k_pos + k_neg <= {m} canaries; "
                        f"got k_pos={k_pos}, k_neg={k_neg}")
    correct = int(ranked[:k_pos].sum()) + int((~ranked[m - k_neg:]).sum())
    return k_pos + k_neg, correct


def epsilon_lower_bound(scores: Sequence[float], included: Sequence[bool], k_pos: int, k_neg: int = 0,
                        delta: float = 0.0, significance: float = 0.05) -> OneRunAudit:
    """The one-run bound for a single, fixed guessing rule: top k_pos "in", bottom k_neg "out".

    k_pos and k_neg must be chosen without looking at which canaries were included.
    """
    scores, included = _check(scores, included, significance, delta)
    guesses, correct = _counts(_ranked(scores, included), k_pos, k_neg)
    eps = epsilon_from_counts(scores.size, guesses, correct, delta, significance)
    return OneRunAudit(eps, scores.size, guesses, correct, k_pos, k_neg, delta, significance, 1)


def roc_hull_cutoffs(scores: np.ndarray, included: np.ndarray) -> list[tuple[int, int]]:
    """(guesses, correct) at the vertices of the upper convex hull of the score-threshold ROC.

    Guessing "in" for every score >= t, over all thresholds t, traces (false, true) positives.
    Thresholds under the hull are dominated in the ROC sense, so only the vertices are tested (as
    jax_privacy does); collinear points are dropped, the "guess nothing" point (0, 0) is kept.
    """
    order = np.argsort(-scores, kind="stable")
    s, inc = scores[order], included[order]
    last_of_tie = np.r_[s[1:] != s[:-1], True]  # a threshold takes in a whole run of equal scores
    tp = np.r_[0, np.cumsum(inc)[last_of_tie]]
    fp = np.r_[0, np.cumsum(~inc)[last_of_tie]]
    hull: list[tuple[int, int]] = []
    for point in zip(fp.tolist(), tp.tolist()):
        while len(hull) >= 2:
            (x0, y0), (x1, y1) = hull[-2], hull[-1]
            if (x1 - x0) * (point[1] - y0) - (y1 - y0) * (point[0] - x0) >= 0:
                hull.pop()  # hull[-1] lies on or below the chord: not a vertex
            else:
                break
        hull.append(point)
    return [(f + t, t) for f, t in hull]


def best_epsilon_lower_bound(scores: Sequence[float], included: Sequence[bool], delta: float = 0.0,
                             significance: float = 0.05,
                             k_grid: Sequence[int | tuple[int, int]] | None = None) -> OneRunAudit:
    """The best one-run bound over several guessing rules, with a Bonferroni correction.

    Every rule is tested at significance / (number of rules), so the reported maximum is still a
    valid bound at `significance` (a union bound over the rules).

    k_grid=None: the rules are the thresholds at the vertices of the ROC's upper convex hull
    (one-sided, k_neg = 0), the number of vertices (including both ends) being the correction,
    as jax_privacy's `CanaryScoreAuditor` does. The set of vertices depends on the data, so this is
    the conventional rather than the strictly rigorous choice; pass a `k_grid` fixed in advance
    (ints for k_pos, or (k_pos, k_neg) pairs) for a correction that holds exactly.
    """
    scores, included = _check(scores, included, significance, delta)
    m = scores.size
    if k_grid is None:
        cutoffs = roc_hull_cutoffs(scores, included)
        rules = [(guesses, 0, guesses, correct) for guesses, correct in cutoffs]
    else:
        if len(k_grid) == 0:
            raise UserError("k_grid must name at least one k")
        ranked = _ranked(scores, included)
        pairs = [(k, 0) if np.isscalar(k) else tuple(k) for k in k_grid]
        rules = [(int(kp), int(kn), *_counts(ranked, int(kp), int(kn))) for kp, kn in pairs]
    level = significance / len(rules)
    best = OneRunAudit(0.0, m, 0, 0, 0, 0, delta, significance, len(rules))
    # Visit the most precise rules first: a rule whose raw precision is no better than the current
    # bound's q = e^eps / (1 + e^eps) has p >= P[W >= v] >= 1/2 > level there, so cannot beat it.
    for k_pos, k_neg, guesses, correct in sorted(rules, key=lambda r: -r[3] / max(r[2], 1)):
        if guesses == 0 or correct / guesses <= expit(best.epsilon):
            continue
        eps = epsilon_from_counts(m, guesses, correct, delta, level)
        if eps > best.epsilon:
            best = OneRunAudit(eps, m, guesses, correct, k_pos, k_neg, delta, significance, len(rules))
    return best
