"""`dptrain audit`: train once with fair-coin canaries, score them, and bound ε from below.

    setup = prepare_audit(cfg, num_canaries)      # coins, canaries, canary data folder, config
    trainer = Trainer(setup.cfg, config_dir)      # the real trainer, unchanged
    initial = keep_initial_weights(trainer, setup)
    trainer.fit()
    report = finish_audit(trainer, setup, initial)  # scores, bound, JSON, figures, privacy report

Everything the audit keeps that derives from the private data or its secret coins (the copy of the
training data with the canaries, canaries and coins, initial weights) is kept owner-only in
`<run>/private/audit/`, never beside the published run; a rerun with the same config finds them
there and resumes. The published results (`audit_report.json`, score histograms over the random
canaries, the ε curve) go into the run folder, and the report lists what was kept private.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dptrain.audit.canaries import (draw_inclusion, gradient_alignment_scores, loss_scores,
                                    random_canaries, weight_delta)
from dptrain.audit.dataset import write_canary_dataset
from dptrain.audit.one_run import best_epsilon_lower_bound
from dptrain.audit.plots import plot_epsilon_curve, plot_score_histogram
from dptrain.checkpoint import load_model, save_model
from dptrain.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from dptrain.errors import UserError
from dptrain.privacy.accounting import StepRun, epsilon_of_runs
from dptrain.privacy.private_files import PRIVATE_DIR, make_private, private_dir
from dptrain.train.config import TrainConfig
from dptrain.train.report import add_section

AUDIT_DIR = "audit"  # inside the run's private folder
REPORT_FILE = "audit_report.json"
CANARY_FILE = "canaries.npz"
DATA_DIR = "data"
INITIAL_DIR = "initial"
SCORERS = ("loss", "gradient")
FIRST_ORDINARY_ID = max(PAD_ID, EOS_ID, BOS_ID, UNK_ID) + 1  # canaries never contain special ids


@dataclass
class AuditSetup:
    cfg: TrainConfig        # the run's config, pointed at the canary data folder
    canaries: torch.Tensor  # [m, seq_len] token ids
    included: np.ndarray    # [m] fair coins: True = in the training set
    folder: Path            # <run>/private/audit


def base_data_path(cfg: TrainConfig) -> Path:
    """The prepared folder the config trains on (the demo is built here when missing)."""
    path = Path(cfg.data.path)
    if cfg.data.source == "demo":
        from dptrain.data.demo import prepare_configured_demo

        path = prepare_configured_demo(cfg.data)
    if not path.is_dir():
        raise UserError(f"data.path {path} does not exist: run `dptrain data prepare` first")
    return path


def private_audit_folder(out_dir: str | Path) -> Path:
    """`<run>/private/audit`, owner-only. Refuses a run whose `<run>/audit/` still holds the public
    copy of the data and the coins that earlier versions wrote: it must not be resumed silently."""
    public = Path(out_dir) / AUDIT_DIR
    if (public / CANARY_FILE).is_file() or (public / DATA_DIR).is_dir():
        raise UserError(f"{public} holds a published copy of the training data and the audit's coins "
                        "(older layout): delete it and this run's checkpoints, or use a new out_dir")
    folder = private_dir(out_dir) / AUDIT_DIR
    folder.mkdir(exist_ok=True)
    return make_private(folder)


def prepare_audit(cfg: TrainConfig, num_canaries: int, seed: int | None = None) -> AuditSetup:
    """Draw (or reload) canaries and coins, write the canary data folder, return the run's config.

    seed=None draws canaries and coins from OS entropy, as a real audit should: its validity rests
    on the coins being independent of everything else in the run.
    """
    from dptrain.data.packed import PackedDataset

    folder = private_audit_folder(cfg.out_dir)
    saved = folder / CANARY_FILE
    data_dir = folder / DATA_DIR
    if saved.is_file():
        with np.load(saved) as f:
            canaries, included = torch.from_numpy(f["tokens"].astype(np.int64)), f["included"].astype(bool)
        if len(included) != num_canaries:
            raise UserError(f"{saved} holds {len(included)} canaries, not {num_canaries}: "
                            "use a new out_dir or the same number")
    else:
        base = PackedDataset(base_data_path(cfg), "train")
        canaries = random_canaries(num_canaries, base.seq_len, base.vocab_size, seed=seed,
                                   low=FIRST_ORDINARY_ID)
        included = draw_inclusion(num_canaries, seed=None if seed is None else seed + 1)
        if included.all() or not included.any():
            raise UserError("every coin fell the same way: the audit needs canaries both in and out")
        make_private(write_canary_dataset(base.path, canaries, included, data_dir))
        np.savez(saved, tokens=canaries.numpy().astype(np.uint32), included=included)
        make_private(saved)
    run_cfg = dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, path=str(data_dir), source="prepared"),
        export=dataclasses.replace(cfg.export, hf_dir=None))
    return AuditSetup(run_cfg, canaries, included, folder)


def keep_initial_weights(trainer, setup: AuditSetup) -> Path | None:
    """Save the weights before training (for the gradient scorer); None when resuming without them."""
    path = setup.folder / INITIAL_DIR
    if trainer.step == 0:
        make_private(save_model(trainer.model, path))
    return path if (path / "model.safetensors").is_file() else None


def score_canaries(model, canaries: torch.Tensor, initial: Path | None,
                   scorers: tuple[str, ...] = SCORERS, progress: bool = True) -> dict[str, np.ndarray]:
    """Scores per scorer (higher = looks trained on). "gradient" needs the initial weights."""
    scores = {}
    if "loss" in scorers:
        scores["loss"] = loss_scores(model, canaries, progress=progress)
    if "gradient" in scorers and initial is not None:
        device = next(model.parameters()).device
        start = load_model(initial).to(device)
        delta = weight_delta({k: v.detach() for k, v in start.named_parameters()}, model)
        scores["gradient"] = gradient_alignment_scores(start, canaries, delta, progress=progress)
    return scores


def epsilon_by_step(runs: tuple[StepRun, ...], delta: float, accountant: str,
                    points: int = 16) -> tuple[list[int], list[float]]:
    """The accountant's ε after each of ~`points` step counts of a ledger (0 at step 0)."""
    total = sum(r.count for r in runs)
    steps = sorted({int(s) for s in np.linspace(0, total, points + 1).round()})
    epsilons = []
    for s in steps:
        prefix, left = [], s
        for r in runs:
            if left == 0:
                break
            prefix.append(dataclasses.replace(r, count=min(r.count, left)))
            left -= prefix[-1].count
        epsilons.append(epsilon_of_runs(prefix, delta, accountant))
    return steps, epsilons


def audit_bounds(scores: dict[str, np.ndarray], included: np.ndarray, delta: float,
                 significance: float) -> dict:
    """One bound per scorer at significance / (number of scorers): the best is a bound at `significance`."""
    level = significance / len(scores)
    per = {name: best_epsilon_lower_bound(s, included, delta=delta, significance=level)
           for name, s in scores.items()}
    best = max(per, key=lambda name: per[name].epsilon)
    return {"epsilon_lower_bound": per[best].epsilon, "best_scorer": best,
            "significance": significance, "significance_per_scorer": level,
            "scorers": {name: {**a.to_dict(),
                               "mean_score_included": float(np.mean(scores[name][included])),
                               "mean_score_excluded": float(np.mean(scores[name][~included]))}
                        for name, a in per.items()}}


def kept_private(initial: Path | None) -> dict[str, str]:
    """The audit's private files, relative to the run folder, and what each holds: for the report."""
    folder = f"{PRIVATE_DIR}/{AUDIT_DIR}"
    files = {f"{folder}/{CANARY_FILE}": "the canaries and their coins (which decide the audit's result)",
             f"{folder}/{DATA_DIR}/": "the copy of the training data with the included canaries, trained on"}
    if initial is not None:
        files[f"{folder}/{INITIAL_DIR}/"] = "the weights before training (the gradient scorer's)"
    return files


def finish_audit(trainer, setup: AuditSetup, initial: Path | None, significance: float = 0.05,
                 scorers: tuple[str, ...] = SCORERS, progress: bool = True) -> dict:
    """Score, bound, write `audit_report.json` + figures into the run folder, extend the privacy report."""
    p = trainer.cfg.privacy
    included = setup.included
    model = trainer.model.eval()
    scores = score_canaries(model, setup.canaries, initial, scorers, progress)
    if not scores:
        raise UserError("no canary scorer could run (the gradient scorer needs the initial weights)")
    out = trainer.out_dir
    accountant_eps = trainer.ledger.epsilon(p.delta, p.accountant)
    bounds = audit_bounds(scores, included, p.delta, significance)
    steps, epsilons = epsilon_by_step(trainer.ledger.runs, p.delta, p.accountant)
    figures = {}
    for name, s in scores.items():
        figures[f"histogram_{name}"] = plot_score_histogram(
            s, included, out / f"audit_scores_{name}.png",
            title=f"{name} scores: audited ε ≥ {bounds['scorers'][name]['epsilon']:.3g}").name
    figures["epsilon_curve"] = plot_epsilon_curve(
        steps, [e if math.isfinite(e) else float("nan") for e in epsilons], out / "epsilon_by_step.png",
        lower_bounds={trainer.step: bounds["epsilon_lower_bound"]}).name
    report = {
        "method": "one-run audit (Steinke, Nasr, Jagielski 2023), fair-coin canaries, Bonferroni over scorers",
        "canaries": {"kind": f"uniformly random token sequences of {setup.canaries.shape[1]} tokens "
                             f"(ids >= {FIRST_ORDINARY_ID}), one privacy unit each",
                     "num": int(len(included)), "included": int(included.sum()),
                     "expected_draws_per_included_canary": trainer.mechanism.expected_participations(trainer.step)},
        **bounds,
        "accountant_epsilon": accountant_eps,
        "accountant": p.accountant,
        "delta": p.delta,
        # A lower bound above the accountant's ε would mean the guarantee is false.
        "consistent_with_accountant": bounds["epsilon_lower_bound"] <= accountant_eps,
        "steps": trainer.step,
        "noise_multiplier": trainer.noise_multiplier,
        "sampling_rate": trainer.sampling_rate,
        "epsilon_by_step": {"steps": steps, "epsilon": epsilons},
        "figures": figures,
        "kept_private": kept_private(initial),  # owner-only, never published
    }
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    make_private(setup.folder)  # again: the trainer adds files to the data copy (its privacy ledger)
    section = {k: report[k] for k in ("epsilon_lower_bound", "best_scorer", "significance",
                                      "accountant_epsilon", "consistent_with_accountant")}
    section.update(num_canaries=report["canaries"]["num"], report=REPORT_FILE, figures=figures)
    add_section(out, "audit", section)
    return report


def summary(report: dict) -> str:
    c = report["canaries"]
    lines = [f"One-run audit: {c['num']} canaries, {c['included']} trained on "
             f"(each drawn ~{c['expected_draws_per_included_canary']:.2g} times), "
             f"{report['steps']} steps, σ = {report['noise_multiplier']:.4g}"]
    for name, a in report["scorers"].items():
        lines.append(f"  {name:8s} ε ≥ {a['epsilon']:.4g} ({a['num_correct']}/{a['num_guesses']} guesses right, "
                     f"ceiling {a['ceiling']:.3g}, significance {report['significance_per_scorer']:.3g})")
    lines.append(f"  audited ε ≥ {report['epsilon_lower_bound']:.4g} at significance {report['significance']:g}; "
                 f"accountant ({report['accountant']}) ε = {report['accountant_epsilon']:.4g} at δ = {report['delta']:g}"
                 + ("" if report["consistent_with_accountant"] else "  -- ABOVE THE ACCOUNTANT: the guarantee is false"))
    return "\n".join(lines)
