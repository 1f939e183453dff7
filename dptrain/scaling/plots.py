"""Planner figures (PNG, matplotlib Agg): best predicted loss against compute for several eps, and
the compute-optimal model size against compute with the non-private optimum (Chinchilla rule)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from dptrain.progress import progress_bar  # noqa: E402

from dptrain.errors import UserError  # noqa: E402
from dptrain.scaling.law import ScalingLaw  # noqa: E402
from dptrain.scaling.plan import chinchilla_params, plan  # noqa: E402


def optimum_curves(law: ScalingLaw, computes, epsilons, delta, data_size, seq_len):
    """{eps: (computes, best loss, optimal M)}; budgets with no feasible plan are left out."""
    curves = {}
    for eps in progress_bar(epsilons, desc="planning per epsilon", unit="eps", disable=None):
        rows = []
        for c in computes:
            try:
                best = plan(law, c, eps, delta, data_size, seq_len, top=1, configs={})[0]
            except UserError:
                continue
            rows.append((c, best.loss, best.params))
        curves[eps] = np.array(rows).reshape(-1, 3).T
    return curves


def plot_planner(law: ScalingLaw, out_dir: str | Path, computes, epsilons, delta: float,
                 data_size: int, seq_len: int) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    curves = optimum_curves(law, computes, epsilons, delta, data_size, seq_len)
    note = f"N = {data_size:.3g} examples, seq len {seq_len}, delta = {delta:g}"

    fig, ax = plt.subplots(figsize=(6, 4))
    for eps, (c, loss, _) in curves.items():
        ax.plot(c, loss, marker="o", ms=3, label=f"eps = {eps:g}")
    ax.set(xscale="log", xlabel="compute C = 6 M B S T (FLOPs)", ylabel="best predicted loss",
           title=f"Predicted loss at the compute-optimal plan\n{note}")
    ax.legend()
    fig.tight_layout()
    loss_path = out_dir / "loss_vs_compute.png"
    fig.savefig(loss_path, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for eps, (c, _, m) in curves.items():
        ax.plot(c, m, marker="o", ms=3, label=f"eps = {eps:g}")
    grid = np.asarray(computes, dtype=float)
    ax.plot(grid, [chinchilla_params(c) for c in grid], "k--", label="non-private (Chinchilla, 20 tok/param)")
    ax.set(xscale="log", yscale="log", xlabel="compute C (FLOPs)", ylabel="optimal parameters M",
           title=f"Compute-optimal model size\n{note}")
    ax.legend()
    fig.tight_layout()
    size_path = out_dir / "optimal_size_vs_compute.png"
    fig.savefig(size_path, dpi=120)
    plt.close(fig)
    return [loss_path, size_path]
