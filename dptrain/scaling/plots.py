"""Planner figures (PNG, matplotlib Agg): best predicted loss against compute for several eps, and
the compute-optimal model size against compute with the non-private optimum (Chinchilla rule).

Both show where the law stops being measured: plans inside the fitted range as filled markers,
extrapolated ones hollow, the bootstrap interval of the loss as a band, the fitted M range shaded."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from dptrain.errors import UserError  # noqa: E402
from dptrain.progress import progress_bar  # noqa: E402
from dptrain.scaling.law import ScalingLaw  # noqa: E402
from dptrain.scaling.plan import chinchilla_params, plan  # noqa: E402


def optimum_curves(law: ScalingLaw, computes, epsilons, delta, data_size, seq_len):
    """{eps: (computes, best loss, optimal M, extrapolation factor, interval low, interval high)};
    budgets with no feasible plan are left out."""
    curves = {}
    for eps in progress_bar(epsilons, desc="planning per epsilon", unit="eps", disable=None):
        rows = []
        for c in computes:
            try:
                best = plan(law, c, eps, delta, data_size, seq_len, top=1, configs={})[0]
            except UserError:
                continue
            low, high = best.interval or (np.nan, np.nan)
            rows.append((c, best.loss, best.params, best.extrapolation, low, high))
        curves[eps] = np.array(rows).reshape(-1, 6).T
    return curves


def plot_planner(law: ScalingLaw, out_dir: str | Path, computes, epsilons, delta: float,
                 data_size: int, seq_len: int) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    curves = optimum_curves(law, computes, epsilons, delta, data_size, seq_len)
    note = f"N = {data_size:.3g} examples, seq len {seq_len}, delta = {delta:g}"

    fig, ax = plt.subplots(figsize=(6, 4))
    for eps, (c, loss, _, outside, low, high) in curves.items():
        line, = ax.plot(c, loss, label=f"eps = {eps:g}")
        _markers(ax, c, loss, outside, line.get_color())
        if np.isfinite(low).any():
            ax.fill_between(c, low, high, color=line.get_color(), alpha=0.15, lw=0)
    ax.set(xscale="log", xlabel="compute C = 6 M B S T (FLOPs)", ylabel="best predicted loss",
           title=f"Predicted loss at the compute-optimal plan\n{note}")
    _legend(ax)
    fig.tight_layout()
    loss_path = out_dir / "loss_vs_compute.png"
    fig.savefig(loss_path, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for eps, (c, _, m, outside, _, _) in curves.items():
        line, = ax.plot(c, m, label=f"eps = {eps:g}")
        _markers(ax, c, m, outside, line.get_color())
    grid = np.asarray(computes, dtype=float)
    ax.plot(grid, [chinchilla_params(c) for c in grid], "k--", label="non-private (Chinchilla, 20 tok/param)")
    ax.axhspan(*law.validity["M"], color="grey", alpha=0.15, label="M range the law was fitted on")
    ax.set(xscale="log", yscale="log", xlabel="compute C (FLOPs)", ylabel="optimal parameters M",
           title=f"Compute-optimal model size\n{note}")
    _legend(ax)
    fig.tight_layout()
    size_path = out_dir / "optimal_size_vs_compute.png"
    fig.savefig(size_path, dpi=120)
    plt.close(fig)
    return [loss_path, size_path]


def _markers(ax, x, y, outside, color) -> None:
    """Filled markers where the plan lies inside the law's fitted range, hollow where extrapolated."""
    inside = outside <= 1
    ax.plot(x[inside], y[inside], "o", ms=4, color=color)
    ax.plot(x[~inside], y[~inside], "o", ms=5, mfc="none", color=color)


def _legend(ax) -> None:
    ax.plot([], [], "o", ms=5, mfc="none", color="grey", label="extrapolated (outside the fitted range)")
    ax.legend(fontsize=7)
