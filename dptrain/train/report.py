"""The privacy report: what was guaranteed, under which accountant, and what it does not cover."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np

from dptrain.data import PackedDataset
from dptrain.privacy import blt
from dptrain.privacy.accounting import is_upper_bound
from dptrain.privacy.group import group_guarantees, sequences_per_unit, unit_guarantees

COMMON_NOT_COVERED = [
    "the tokenizer, when it was trained on the private data (train it on public text)",
    "hyper-parameter search: every run tried on the private data spends budget of its own",
    "the held-out evaluation split: never trained on, and without a guarantee of its own; the held-out "
    "loss over it is released without noise (eval.max_sequences: 0 releases none)",
    "the size of the training set (sequences or units): it sets the sampling rate q, is released as "
    "dataset_size and is treated as public by the accounting",
    "the run's private state (train_state.pt in each checkpoint): it holds the run's secret",
]
# What crosses the unit is what stays outside.
UNIT_NOT_COVERED = {
    "sequence": ["text duplicated across many sequences, and a document or user spanning several: the unit is "
                 "one sequence, so g sequences are protected only at group privacy (see 'group_privacy')"],
    "document": ["text duplicated across documents, and a person with several documents: each "
                 "document is one unit, so m documents are protected only at group privacy over m units"],
    "group": ["text shared by several groups (a secret copied into m groups' records is protected only "
              "at group privacy over m units)",
              "a person whose records carry several values of the group column: the unit is the "
              "column's value, not a verified identity"],
}
# Group sizes the report gives the group-privacy guarantee for: public, unlike the data's own spans.
GROUP_SIZES = (2, 4, 8, 16, 32)
RANDOMNESS = {
    "secret": "a fresh 256-bit secret from the OS, kept only in the private train_state.pt",
    "seed": "an explicit runtime.seed: the guarantee holds only while that seed stays secret",
    "secure": "sampling and noise from the OS CSPRNG; nothing can replay them",
}
PRIVATE_STATISTICS = ("realised_batch_size", "truncated_steps", "nonfinite_examples")


def privacy_report(trainer) -> dict:
    p = trainer.cfg.privacy
    sizes = np.asarray(trainer.batch_sizes, dtype=np.int64)
    books, mechanism = trainer.books, trainer.mechanism
    # PRV's estimate (seconds to a minute at large epsilon), and the data's total when other runs
    # share the data, only in the final report, not every checkpoint's
    final = trainer.step >= p.steps
    epsilons = books.ledger.epsilons(p.delta, estimates=final) if books.ledger.steps else {}
    unit = p.unit
    column = trainer.train_data.manifest.get("group_column")
    named = {"sequence": "one training sequence", "document": "one training document (all its sequences)",
             "group": f"one group (all documents sharing a value of {column!r})"}[unit]
    report = {
        "guarantee": f"({epsilons.get(p.accountant, 0.0):.4g}, {p.delta:g})-DP with respect to {named}",
        "epsilon": epsilons,
        # Accountants whose figure is an estimate, not a bound: shown, never the guarantee.
        "estimates": [name for name in epsilons if not is_upper_bound(name)],
        "delta": p.delta,
        "accountant": p.accountant,
        "planned_epsilon": trainer.planned_epsilon,
        "target_epsilon": p.target_epsilon,
        "noise_multiplier": mechanism.noise_multiplier,
        "sampling_rate": mechanism.sampling_rate,
        "sampling": ("Poisson" + (f", truncated at {p.max_batch_size}" if p.max_batch_size else "")
                     if mechanism.bands == 1 else
                     f"cyclic Poisson: {mechanism.bands} parts drawn at random, step t samples part t mod "
                     f"{mechanism.bands} at rate {mechanism.sampling_rate:.4g}"),
        # dpsgd: independent noise; bandmf: noise correlated by a banded Toeplitz C (columns of norm 1),
        # accounted as one subsampled Gaussian per round of `bands` steps (amplified BandMF); blt:
        # noise correlated by a buffered Toeplitz C, `bands` parts taken in turn, accounted as the
        # Gaussian mechanism at σ / sensitivity (no amplification)
        "mechanism": {"kind": mechanism.kind, "bands": mechanism.bands,
                      **({"coefficients": list(mechanism.coefficients)} if mechanism.blt is None else
                         {**mechanism.blt.state(), "sensitivity": mechanism.sensitivity(trainer.step)})},
        "steps": trainer.step,
        "planned_steps": p.steps,
        # Every noisy step that touched the data: this run's, its parents', and any a crash lost.
        "accounted_steps": books.ledger.steps,
        "crash_released_steps": books.crash_released_steps,
        # Every run the data's own ledger records on this data, whatever weights they started from.
        "data_spent": books.data_epsilon(p.delta, p.accountant, epsilons.get(p.accountant, 0.0), compose=final),
        "randomness": {"mode": trainer.randomness["mode"], "means": RANDOMNESS[trainer.randomness["mode"]]},
        "initialization": trainer.initialization or {"source": None, "kind": "random"},
        "lineage": trainer.lineage,
        "tokenizer": trainer.train_data.manifest["tokenizer"].get("provenance", "unknown"),
        "dataset_size": mechanism.num_examples,
        "expected_batch_size": p.expected_batch_size,
        "realised_batch_size": {
            "mean": float(sizes.mean()) if len(sizes) else None,
            "min": int(sizes.min()) if len(sizes) else None,
            "max": int(sizes.max()) if len(sizes) else None,
        },
        "truncated_steps": trainer.sampler.truncated_steps,
        # Zeroed, never skipped: a count from private data, released un-noised like the logs.
        "nonfinite_examples": trainer.nonfinite_examples,
        "clip_norm": p.max_grad_norm,
        "secure_randomness": p.secure_randomness,
        "privacy_unit": (f"one packed sequence of {trainer.train_data.seq_len} tokens" if unit == "sequence"
                         else _unit_description(trainer)),
        "dataset_unit": "sequences" if unit == "sequence" else f"{unit}s",
        "group_privacy": group_guarantees(epsilons.get(p.accountant, 0.0), p.delta, GROUP_SIZES),
        "not_covered": [*COMMON_NOT_COVERED[:-1], *UNIT_NOT_COVERED[unit], COMMON_NOT_COVERED[-1]],
    }
    if unit != "sequence":
        report["unit"] = {"kind": unit, "group_column": column if unit == "group" else None,
                          "num_units": mechanism.num_examples, "max_sequences_per_unit": p.max_sequences_per_unit}
    private = trainer.cfg.logging.private_metrics
    if private:
        # How many sequences the data's documents and users span: exact statistics of private data.
        report["units"] = (unit_guarantees(epsilons.get(p.accountant, 0.0), p.delta, _units(trainer))
                           if unit == "sequence" else {})
        if unit != "sequence":
            counts = trainer.unit_ranges[1]
            report["unit"].update(sequences_per_unit_max=int(counts.max()),
                                  sequences_per_unit_mean=round(float(counts.mean()), 2))
        report["released_outside_guarantee"] = [
            "per-step metrics prefixed 'private/' (training loss, clipped fraction, median gradient "
            "norm, drawn batch size, and step time, tokens/s and MFU, which grow with the drawn batch "
            "size), and the progress bar's elapsed time and rate", *PRIVATE_STATISTICS,
            "units: sequences per document and per group (largest and mean) of the training data"]
    else:  # statistics of the private batches and data stay in the private state
        for key in PRIVATE_STATISTICS:
            del report[key]
    return report


def _unit_description(trainer) -> str:
    k = trainer.cfg.privacy.max_sequences_per_unit
    return (f"one {trainer.cfg.privacy.unit}: each step samples it with probability q and then uses at most "
            f"{k} of its sequences of {trainer.train_data.seq_len} tokens (drawn afresh each time), "
            "their summed loss's gradient clipped as one vector")


def _units(trainer) -> dict:
    """Sequences per document and group (computed once per data folder)."""
    return _sequences_per_unit(str(trainer.train_data.path))


@functools.lru_cache(maxsize=4)
def _sequences_per_unit(path: str) -> dict:
    return sequences_per_unit(PackedDataset(path, split="train"))


def summary(report: dict) -> str:
    estimates = set(report.get("estimates", ()))
    eps = ", ".join(f"{name} {value:.4g}" + (" (estimate, not a guarantee)" if name in estimates else "")
                    for name, value in report["epsilon"].items()) or "none spent"
    sizes = report.get("realised_batch_size") or {}
    lines = [
        f"Privacy guarantee: {report['guarantee']}",
        f"  epsilon at delta={report['delta']:g}: {eps}",
        f"  noise multiplier {report['noise_multiplier']:.4g}, clip norm {report['clip_norm']:g}, "
        f"sampling rate {report['sampling_rate']:.4g} ({report['sampling']})",
        f"  steps {report['steps']} of {report['planned_steps']}, dataset {report['dataset_size']} "
        f"{report.get('dataset_unit', 'sequences')}, expected batch {report['expected_batch_size']}"
        + (f", realised {sizes['mean']:.1f} on average ({sizes['min']}-{sizes['max']})" if sizes.get("mean") else ""),
        *_context_lines(report),
        f"  privacy unit: {report['privacy_unit']}",
        *([f"  units: {u['num_units']} {u['kind']}s"
           + (f" of up to {u['sequences_per_unit_max']} sequences (mean {u['sequences_per_unit_mean']:g})"
              if "sequences_per_unit_max" in u else "")
           + f"; at most {u['max_sequences_per_unit']} sequences each used per step"]
          if (u := report.get("unit")) else []),
        *_group_lines(report),
        *[f"  per {unit}: up to {u['sequences_max']} sequences (mean {u['sequences_mean']:g}); "
          + _largest_unit(u) for unit, u in report.get("units", {}).items()],
        "  not covered:",
        *[f"    - {item}" for item in report["not_covered"]],
        *[f"  released outside the guarantee: {item}" for item in report.get("released_outside_guarantee", [])],
        *measured_lines(report),
    ]
    return "\n".join(lines)


def _context_lines(report: dict) -> list[str]:
    lines = []
    if "truncated_steps" in report:
        lines.append(f"  truncated steps: {report['truncated_steps']}")
    bands = report.get("mechanism", {}).get("bands", 1)
    if report.get("mechanism", {}).get("kind") == "blt":
        m = report["mechanism"]
        lag = blt.from_state(m).lag
        noise = (f"no stored buffer (C⁻¹ = I − λS, λ {lag:.4g}: each step's noise less λ times the previous "
                 "step's, drawn again; secure randomness keeps it as one buffer)" if lag is not None
                 else f"{len(m['decays'])} buffers")
        lines.append(f"  mechanism: BLT with {noise}, the data in {bands} parts taken in turn "
                     f"(each unit at most once every {bands} steps), sensitivity {m['sensitivity']:.4g}")
        lines.append("  accounted: the Gaussian mechanism at σ / sensitivity, without amplification by sampling")
    elif bands > 1:  # the ledger counts BandMF's rounds of b steps, each one subsampled Gaussian
        lines.append(f"  mechanism: BandMF with {bands} bands (each step's noise correlated with the previous "
                     f"{bands - 1} steps')")
        lines.append(f"  accounted: {report['accounted_steps']} subsampled Gaussian releases (a round of {bands} "
                     f"steps each, earlier runs of the lineage and {report.get('crash_released_steps', 0)} steps "
                     "released before a crash included)")
    elif report.get("accounted_steps", report["steps"]) != report["steps"]:
        lines.append(f"  accounted steps: {report['accounted_steps']} (earlier runs of the lineage and "
                     f"{report.get('crash_released_steps', 0)} released before a crash included)")
    if (data := report.get("data_spent")) and data["epsilon"] is not None:
        lines.append(f"  spent on this data by all {data['runs']} run(s) its ledger records: ε {data['epsilon']:.4g} "
                     f"({data['accountant']}, {data['steps']} {'releases' if bands > 1 else 'steps'})")
    if randomness := report.get("randomness"):
        lines.append(f"  randomness: {randomness['means']}")
    if (init := report.get("initialization")) and init.get("source"):
        lines.append(f"  initialized from {init['source']} ({init['kind']})")
    if tokenizer := report.get("tokenizer"):
        source = tokenizer if isinstance(tokenizer, str) else ", ".join(
            f"{t['name']} ({t['sha256'][:12]})" for t in tokenizer.get("trained_on", [])) or "unknown"
        lines.append(f"  tokenizer trained on: {source}")
    return lines


def _group_lines(report: dict) -> list[str]:
    rows = report.get("group_privacy") or []
    if not rows:
        return []
    unit = report.get("unit", {}).get("kind", "sequence")
    return [f"  group privacy (a secret or person spanning g {unit}s): "
            + ", ".join(f"g={r['size']}: " + (f"({r['epsilon']:.3g}, {r['delta']:.2g})" if r["delta"] < 1
                                              else "none") for r in rows)]


def _largest_unit(u: dict) -> str:
    if u["delta_of_largest"] >= 1:  # group privacy gives nothing: say so rather than print (ε, 1)
        return "the largest has no guarantee from group privacy (its δ reaches 1)"
    return f"the largest is protected at ({u['epsilon_of_largest']:.4g}, {u['delta_of_largest']:.3g})"


def measured_lines(report: dict) -> list[str]:
    """Summary lines of the empirical section `dptrain audit` adds, if any. (`dptrain memorization`
    publishes nothing: its results are computed from private sequences without noise.)"""
    if not (audit := report.get("audit")):
        return []
    return [f"  audit: ε ≥ {audit['epsilon_lower_bound']:.4g} from {audit['num_canaries']} canaries "
            f"at significance {audit['significance']:g} (accountant ε {audit['accountant_epsilon']:.4g})"]


def add_section(folder: Path, name: str, section: dict) -> dict | None:
    """Add a section (e.g. "audit") to the folder's privacy report; None when it has none."""
    path = Path(folder) / "privacy_report.json"
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    report[name] = section
    write_report(report, folder)
    return report


def write_report(report: dict, folder: Path) -> None:
    folder = Path(folder)
    (folder / "privacy_report.json").write_text(json.dumps(report, indent=2) + "\n")
    (folder / "privacy_report.txt").write_text(summary(report) + "\n")
