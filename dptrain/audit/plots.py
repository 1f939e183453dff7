"""PNG figures for privacy reports. Uses matplotlib's object API (no pyplot, no global backend)."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from dptrain.audit.memorization import MemorizationResult
from dptrain.errors import UserError


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    return path


def plot_score_histogram(scores: Sequence[float], included: Sequence[bool], path: str | Path,
                         title: str = "Canary scores", bins: int = 40) -> Path:
    """Overlaid histograms of the scores of included and excluded canaries."""
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    if scores.shape != included.shape or scores.size == 0:
        raise UserError(f"need one inclusion flag per score, got {scores.size} and {included.size}")
    edges = np.histogram_bin_edges(scores, bins=bins)
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ax.hist(scores[included], bins=edges, alpha=0.6, label=f"included ({included.sum()})")
    ax.hist(scores[~included], bins=edges, alpha=0.6, label=f"excluded ({(~included).sum()})")
    ax.set_xlabel("score (higher = looks trained on)")
    ax.set_ylabel("canaries")
    ax.set_title(title)
    ax.legend()
    return _save(fig, path)


def plot_epsilon_curve(steps: Sequence[int], epsilons: Sequence[float], path: str | Path,
                       lower_bounds: Mapping[int, float] | None = None,
                       title: str = "Privacy spent") -> Path:
    """Accountant epsilon against training steps, with audited lower bounds (step -> eps) as dots."""
    if len(steps) != len(epsilons) or not steps:
        raise UserError(f"need as many epsilons as steps (and at least one), got {len(epsilons)} and {len(steps)}")
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ax.plot(steps, epsilons, label="accountant ε (upper bound)")
    if lower_bounds:
        xs = sorted(lower_bounds)
        ax.scatter(xs, [lower_bounds[x] for x in xs], color="C3", zorder=3, label="audited ε (lower bound)")
    ax.set_xlabel("step")
    ax.set_ylabel("ε")
    ax.set_title(title)
    ax.legend()
    return _save(fig, path)


def plot_memorization(result: MemorizationResult, path: str | Path) -> Path:
    """Histogram of normalised edit distances between greedy continuations and true suffixes."""
    dist = np.asarray(result.normalized_distances)
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ax.hist(dist, bins=np.linspace(0, max(1.0, float(dist.max(initial=0))), 41))
    ax.axvline(result.approx_threshold, color="C3", linestyle="--",
               label=f"approximate match ≤ {result.approx_threshold:.0%}")
    ax.set_xlabel(f"edit distance / {result.suffix_len} tokens")
    ax.set_ylabel("sequences")
    ax.set_title(f"{result.num_sequences} sequences, {result.prefix_len}-token prefix: "
                 f"exact {result.exact_rate:.2%}, approx {result.approx_rate:.2%}", fontsize=9)
    ax.legend()
    return _save(fig, path)


def plot_exposure(secrets: Sequence[Mapping], num_references: int, path: str | Path) -> Path:
    """Exposure of each planted secret against how many training sequences hold it."""
    if not secrets:
        raise UserError("no secrets to plot")
    repeats = np.array([s["train_repeats"] for s in secrets], dtype=float)
    exposures = np.array([s["exposure"] for s in secrets], dtype=float)
    levels = np.unique(repeats)
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ax.scatter(repeats, exposures, alpha=0.7, label="secret")
    ax.plot(levels, [exposures[repeats == r].mean() for r in levels], color="C1", marker="o", label="mean")
    _finish_exposure_axes(ax, levels, num_references, "training sequences containing the secret")
    return _save(fig, path)


def _finish_exposure_axes(ax, levels, num_references: int, xlabel: str) -> None:
    """Reference lines (fully memorised, never seen), repeat-count axis, labels and legend."""
    ax.axhline(np.log2(num_references + 1), color="C3", linestyle="--", label="fully memorised")
    ax.axhline(1 / np.log(2), color="grey", linestyle=":", label="never seen (expected)")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xticks(levels)
    ax.set_xticklabels([str(int(r)) for r in levels])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("exposure (bits)")
    ax.set_title(f"Secret exposure against {num_references} references", fontsize=9)
    ax.legend(fontsize=8)


def plot_exposure_by_run(runs: Mapping[str, Sequence[Mapping]], num_references: int, path: str | Path) -> Path:
    """Mean exposure by repeat count for several runs on the same secrets (e.g. privacy units)."""
    if not runs or not all(runs.values()):
        raise UserError("every run needs secrets to plot")
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    all_levels = set()
    for i, (name, secrets) in enumerate(runs.items()):
        repeats = np.array([s["train_repeats"] for s in secrets], dtype=float)
        exposures = np.array([s["exposure"] for s in secrets], dtype=float)
        levels = np.unique(repeats)
        all_levels.update(levels.tolist())
        ax.scatter(repeats, exposures, color=f"C{i}", alpha=0.35, s=14)
        ax.plot(levels, [exposures[repeats == r].mean() for r in levels], color=f"C{i}", marker="o",
                label=f"{name} (mean)")
    _finish_exposure_axes(ax, sorted(all_levels), num_references, "training records containing the secret")
    return _save(fig, path)
