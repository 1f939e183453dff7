"""`dptrain memorization`: the extraction test and secret exposure for a trained checkpoint.

Two measurements on the training data the checkpoint saw:
- the extraction test VaultGemma reports: 50-token prefixes of sampled training sequences, does
  greedy decoding reproduce the 50-token suffix exactly, or within 10% edit distance;
- exposure (Secret Sharer) of the secrets planted in the demo corpus (`canaries.json` of the
  prepared folder), each planted 0, 1, 4 or 16 times. The guarantee covers one sequence; a secret
  repeated in k sequences is protected only at group privacy k·ε, and exposure shows it.

Both are computed from private training sequences without noise, so every output (per-sequence
distances, exposures, figures, even the match rates) is kept in the run's private area,
`<run>/private/memorization/<step-*>/` (or `--out`), owner-only; nothing is published.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from dptrain import configio
from dptrain.audit.memorization import (continuation_log_likelihood, exposure_from_log_likelihoods,
                                        memorization_test, sample_windows)
from dptrain.audit.plots import plot_epsilon_curve, plot_exposure, plot_memorization
from dptrain.checkpoint import load_model
from dptrain.data.packed import PackedDataset
from dptrain.errors import UserError
from dptrain.generate import greedy_generate
from dptrain.privacy.private_files import make_private, private_dir
from dptrain.progress import progress_bar

REPORT_FILE = "memorization.json"
SUMMARY_FILE = "memorization.txt"
CANARIES_FILE = "canaries.json"
OUTPUT_DIR = "memorization"  # inside the run's private folder
FIGURE_FILES = ("memorization.png", "exposure.png", "epsilon_by_step.png")


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder (its latest checkpoint)."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        return path
    done = sorted(c for c in (path / "checkpoints").glob("step-*") if (c / "model.safetensors").is_file())
    if not done:
        raise UserError(f"{path} is neither a checkpoint folder (model.safetensors) nor a run folder "
                        "with checkpoints/step-*")
    return done[-1]


def output_folder(checkpoint: Path, out: str | Path | None = None) -> Path:
    """The owner-only folder for a checkpoint's results: `<run>/private/memorization/<step-*>`, or
    `out`. `out` may hold only earlier results, since all of it is made owner-only (this also keeps
    results out of a published folder such as the checkpoint's)."""
    if out is not None:
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} is a file, not a folder")
        ours = {REPORT_FILE, SUMMARY_FILE, *FIGURE_FILES}
        others = sorted(p.name for p in out.iterdir() if p.name not in ours) if out.is_dir() else []
        if others:
            raise UserError(f"--out {out} holds other files ({others[0]}, ...): give a new or empty "
                            "folder, it is made owner-only")
        out.mkdir(parents=True, exist_ok=True)
        return make_private(out)
    if checkpoint.parent.name != "checkpoints":
        raise UserError(f"{checkpoint} is not in a run folder (<run>/checkpoints/step-*), so it has no "
                        "private area: pass --out FOLDER (made owner-only) for its results")
    folder = private_dir(checkpoint.parent.parent) / OUTPUT_DIR / checkpoint.name
    folder.mkdir(parents=True, exist_ok=True)
    make_private(folder.parent)  # memorization/ and every checkpoint's results in it
    return folder


def training_data_path(checkpoint: Path) -> Path:
    """The prepared folder the checkpoint was trained on, from its saved training config."""
    from dptrain.audit.pipeline import base_data_path
    from dptrain.train.config import TrainConfig

    saved = checkpoint / "train_config.yaml"
    if not saved.is_file():
        raise UserError(f"{checkpoint} has no train_config.yaml: pass --data PREPARED_FOLDER")
    return base_data_path(configio.from_dict(TrainConfig, configio.read_yaml(saved)))


def training_windows(data: PackedDataset, num: int, length: int, seed: int) -> torch.Tensor:
    """`num` random windows of `length` tokens from distinct training sequences (read lazily).
    Data packed by unit: full sequences only, so no window reaches a unit's padding."""
    if data.unit == "sequence":
        num = min(num, len(data))
        rows = np.sort(np.random.default_rng(seed).choice(len(data), size=num, replace=False))
    else:
        full = np.flatnonzero(data.real_tokens(np.arange(len(data))) == data.seq_len)
        num = min(num, len(full))
        rows = np.sort(np.random.default_rng(seed).choice(full, size=num, replace=False))
    return sample_windows(data.batch(rows), num, length, seed=seed)


def demo_secret_candidates(seed: int):
    """Endless secrets drawn like the demo's (`dptrain.data.demo.make_canaries`): 4 digits, a word,
    4 digits. The reference space for exposure."""
    from dptrain.data.demo import SECRET_WORDS

    rng = random.Random(f"exposure-references-{seed}")
    while True:
        yield f"{rng.randint(1000, 9999)}-{rng.choice(SECRET_WORDS)}-{rng.randint(1000, 9999)}"


def _split_ids(sp, prefix: str, secret: str) -> tuple[list[int], list[int]]:
    """Context and secret ids as the secret appears in training text (after a space, mid-stream)."""
    context = sp.encode(" " + prefix.rstrip())
    full = sp.encode(" " + prefix + secret)
    if full[:len(context)] != context:
        raise UserError(f"the tokenizer merges the prefix {prefix!r} into its secret")
    return context, full[len(context):]


@torch.no_grad()
def secret_exposures(model, sp, canaries: list[dict], num_references: int = 1000, seed: int = 0,
                     progress: bool = True) -> list[dict]:
    """Exposure and greedy extraction of each planted secret, against `num_references` candidates."""
    results = []
    for canary in progress_bar(canaries, desc="secret exposure", disable=not progress):
        context, secret = _split_ids(sp, canary["prefix"], canary["secret"])
        ctx = torch.tensor(context)
        by_length: dict[int, list[list[int]]] = {}
        for candidate in demo_secret_candidates(seed):
            if sum(len(v) for v in by_length.values()) == num_references:
                break
            if candidate != canary["secret"]:
                ids = _split_ids(sp, canary["prefix"], candidate)[1]
                by_length.setdefault(len(ids), []).append(ids)
        refs = np.concatenate([continuation_log_likelihood(model, ctx, torch.tensor(rows[i:i + 256]))
                               for rows in by_length.values() for i in range(0, len(rows), 256)])
        own = float(continuation_log_likelihood(model, ctx, torch.tensor([secret]))[0])
        greedy = greedy_generate(model, ctx[None], len(secret))[0].tolist()
        results.append({"id": canary["id"], "repeats": canary["repeats"],
                        "train_repeats": canary.get("train_repeats", canary["repeats"]),
                        "extracted": greedy == secret,
                        **exposure_from_log_likelihoods(own, refs).to_dict()})
    return results


def privacy_curve(checkpoint: Path) -> dict | None:
    """The accountant's ε against steps from the checkpoint's ledger; None without training state."""
    from dptrain.audit.pipeline import epsilon_by_step
    from dptrain.privacy.accounting import PrivacyLedger

    state_file, config_file = checkpoint / "train_state.pt", checkpoint / "train_config.yaml"
    if not (state_file.is_file() and config_file.is_file()):
        return None
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"{state_file} is corrupt ({type(err).__name__})") from None
    ledger = PrivacyLedger()
    ledger.load_state_dict(state["ledger"])
    privacy = configio.read_yaml(config_file)["privacy"]
    steps, epsilons = epsilon_by_step(ledger.runs, privacy["delta"], privacy["accountant"])
    return {"steps": steps, "epsilon": epsilons, "delta": privacy["delta"], "accountant": privacy["accountant"]}


def secrets_section(model, sp, canaries: list[dict], num_references: int, seed: int, progress: bool) -> dict:
    """Exposure of every planted secret, and its mean and greedy extractions per repeat count."""
    secrets = secret_exposures(model, sp, canaries, num_references, seed, progress)
    by_repeats: dict[int, list[float]] = {}
    for s in secrets:
        by_repeats.setdefault(s["train_repeats"], []).append(s["exposure"])
    return {
        "num_references": num_references,
        "max_possible_exposure": float(np.log2(num_references + 1)),
        "mean_exposure_by_repeats": {str(k): float(np.mean(v)) for k, v in sorted(by_repeats.items())},
        "extracted_by_repeats": {str(k): sum(s["extracted"] for s in secrets if s["train_repeats"] == k)
                                 for k in sorted(by_repeats)},
        "canaries": secrets,
    }


def run_memorization(checkpoint: str | Path, data: str | Path | None = None, num_sequences: int = 200,
                     prefix_len: int = 50, suffix_len: int = 50, num_references: int = 1000,
                     seed: int = 0, out: str | Path | None = None, progress: bool = True) -> dict:
    """Both tests on a checkpoint; writes memorization.json, a summary and figures, owner-only, into
    `output_folder(checkpoint, out)`. Publishes nothing: the privacy reports are left untouched."""
    checkpoint = resolve_checkpoint(checkpoint)
    out = output_folder(checkpoint, out)  # before the work: a bad --out fails at once
    data_dir = Path(data) if data is not None else training_data_path(checkpoint)
    train = PackedDataset(data_dir, "train")
    model = load_model(checkpoint).eval()
    if train.vocab_size != model.cfg.vocab_size:
        raise UserError(f"{data_dir} has a vocabulary of {train.vocab_size}, the model {model.cfg.vocab_size}")
    windows = training_windows(train, num_sequences, prefix_len + suffix_len, seed)
    extraction = memorization_test(model, windows, prefix_len, suffix_len, progress=progress)
    report = {"checkpoint": str(checkpoint), "data": str(data_dir), "folder": str(out),
              "extraction": extraction.to_dict(),
              "figures": {"extraction": plot_memorization(extraction, out / FIGURE_FILES[0]).name}}

    canaries_path = data_dir / CANARIES_FILE
    if canaries_path.is_file():
        from dptrain.data.tokenizer import load_tokenizer

        tokenizer = checkpoint / "tokenizer.model"
        sp = load_tokenizer(tokenizer if tokenizer.is_file() else train.tokenizer_path)
        report["secrets"] = secrets_section(model, sp, json.loads(canaries_path.read_text()), num_references,
                                            seed, progress)
        report["figures"]["exposure"] = plot_exposure(report["secrets"]["canaries"], num_references,
                                                      out / FIGURE_FILES[1]).name
    curve = privacy_curve(checkpoint)
    if curve is not None:
        report["epsilon_by_step"] = curve
        report["figures"]["epsilon_curve"] = plot_epsilon_curve(
            curve["steps"], curve["epsilon"], out / FIGURE_FILES[2],
            title=f"Privacy spent ({curve['accountant']}, δ = {curve['delta']:g})").name
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    (out / SUMMARY_FILE).write_text(summary(report) + "\n")
    make_private(out)
    return report


def summary(report: dict) -> str:
    e = report["extraction"]
    lines = [f"Extraction test on {report['checkpoint']}: {e['num_sequences']} training sequences, "
             f"{e['prefix_len']}-token prefix, {e['suffix_len']}-token suffix",
             f"  exact {e['exact_matches']} ({e['exact_rate']:.2%}), within {e['approx_threshold']:.0%} edit "
             f"distance {e['approx_matches']} ({e['approx_rate']:.2%})"]
    if s := report.get("secrets"):
        lines.append(f"Secret exposure against {s['num_references']} references "
                     f"(max {s['max_possible_exposure']:.3g} bits, ~1.44 for a secret never seen):")
        for k, v in s["mean_exposure_by_repeats"].items():
            lines.append(f"  planted in {k:>2} training sequences: mean exposure {v:.3g} bits, "
                         f"greedily extracted {s['extracted_by_repeats'][k]} of "
                         f"{sum(c['train_repeats'] == int(k) for c in s['canaries'])}")
    return "\n".join(lines)
