"""Synthetic sweep results drawn from a known parametric law plus noise, to test the fits and the
planner before real sweeps exist. `illustrative_law` has the qualitative shape reported by
McKenna et al. 2025 (noise hurts large models more); its numbers are made up, not fitted."""
from __future__ import annotations

import math

import numpy as np

from dptrain.scaling.law import ParametricLaw
from dptrain.scaling.results import RunResult


def illustrative_law(validity: dict | None = None) -> ParametricLaw:
    params = {"log_E": math.log(1.8), "log_A": math.log(126.0), "alpha": 0.3,
              "log_B": math.log(15.8), "beta": 0.4, "log_C": math.log(0.003), "gamma": 1.0,
              "gamma2": -0.5}
    validity = validity or {"M": [1e5, 1e10], "T": [10, 1e7], "sigma_bar": [1e-8, 1e-1]}
    return ParametricLaw("parametric", "total", validity, params=params)


def synthetic_runs(law: ParametricLaw, sizes=(2e5, 6e5, 2e6, 6e6), sigma_bars=(1e-5, 1e-4, 1e-3),
                   steps=(1000, 4000), evals: int = 20, noise: float = 0.005, seq_len: int = 256,
                   batch_size: int = 256, seed: int = 0) -> list[RunResult]:
    """One run per (M, sigma_bar, steps); eval losses = law x (1 + noise * N(0, 1))."""
    rng = np.random.default_rng(seed)
    runs = []
    for m in sizes:
        for sb in sigma_bars:
            for t in steps:
                eval_steps = np.unique(np.linspace(t / evals, t, evals).astype(int))
                loss = (law.predict(m, eval_steps, sb, batch_size, warn=False)
                        * (1 + noise * rng.standard_normal(len(eval_steps))))
                runs.append(RunResult(
                    run_id=f"m{m:.0e}-sb{sb:.0e}-t{t}", model="synthetic", params_total=int(m),
                    params_nonembed=int(m * 0.8), batch_size=batch_size, steps=t,
                    sigma=sb * batch_size, sigma_bar=sb, seq_len=seq_len,
                    tokens=batch_size * seq_len * t,
                    eval_curve=tuple((int(s), float(l)) for s, l in zip(eval_steps, loss)),
                    wall_time_s=0.0, device="synthetic", date="1970-01-01T00:00:00Z"))
    return runs
