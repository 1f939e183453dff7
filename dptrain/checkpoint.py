"""Checkpoint folders: `config.yaml` (the model config) and `model.safetensors` (the weights).

Writes are atomic: everything goes into a temporary sibling folder that is renamed into place
only when complete, so a crash never leaves a folder that looks like a finished checkpoint.
Training adds its own files (optimizer, sampler, privacy ledger) and `checksums.json`, the SHA-256
of every file, so a load notices a file damaged after it was written (a disk fault, a bad copy).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dptrain.errors import UserError
from dptrain.model import Decoder, DecoderConfig

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"
CHECKSUM_FILE = "checksums.json"
# A checkpoint is shared without its private state: a copy may leave it out and still be intact.
MAY_BE_LEFT_OUT = ("train_state.pt",)


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; on success it replaces `final` in one rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_model(model: Decoder, folder: Path) -> None:
    """Write config and weights into an existing folder (use inside `atomic_dir`)."""
    model.cfg.to_yaml(folder / CONFIG_FILE)
    state = {k: v.detach().contiguous().cpu() for k, v in model.unique_state_dict().items()}
    save_file(state, folder / WEIGHTS_FILE, metadata={"format": "pt", "producer": "dptrain"})


def save_model(model: Decoder, path: str | Path) -> Path:
    with atomic_dir(path) as tmp:
        write_model(model, tmp)
    return Path(path)


def load_config(path: str | Path) -> DecoderConfig:
    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        # a run folder or its checkpoints/ folder given instead of one checkpoint: name the latest
        inside = sorted(p for pattern in ("*/", "checkpoints/*/") for p in path.glob(pattern)
                        if (p / CONFIG_FILE).is_file()) if path.is_dir() else []
        hint = f"; the latest checkpoint in it is {inside[-1]}" if inside else ""
        raise UserError(f"{path} is not a dptrain checkpoint (no {CONFIG_FILE}){hint}")
    return DecoderConfig.from_yaml(path / CONFIG_FILE)


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> Decoder:
    """Rebuild the model of a checkpoint folder; a missing, corrupt or mismatched file is a UserError."""
    path = Path(path)
    cfg = load_config(path)
    verify(path, weights=False)  # the checksums; the values are checked once loaded
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise UserError(f"{path} has no {WEIGHTS_FILE}")
    try:
        state = load_file(weights, device=str(map_location))
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{weights} is corrupt or unreadable ({err})") from None
    if (why := _nonfinite(state)) is not None:
        raise UserError(f"checkpoint {path} is damaged: {why}")
    model = Decoder(cfg).to(map_location)
    model.load_unique_state_dict(state)
    return model


def _sha256(file: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUM_FILE)


def write_checksums(folder: str | Path) -> None:
    """Record the SHA-256 of every file in `folder` (last, once everything else is written)."""
    folder = Path(folder)
    sums = {str(p.relative_to(folder)): _sha256(p) for p in _files(folder)}
    (folder / CHECKSUM_FILE).write_text(json.dumps(sums, indent=1, sort_keys=True) + "\n")


def damage(folder: str | Path, weights: bool = True) -> str | None:
    """Why `folder` cannot be trusted (a file missing, changed, or non-finite weights), or None.
    A folder written before checksums existed is checked for its weights only; `weights=False`
    skips reading the weights (for a caller that loads and checks them itself)."""
    folder = Path(folder)
    file = folder / CHECKSUM_FILE
    if file.is_file():
        try:
            sums = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return f"{CHECKSUM_FILE} is corrupt"
        for name, want in sums.items():
            if not (folder / name).is_file():
                if name in MAY_BE_LEFT_OUT:
                    continue
                return f"{name} is missing"
            if _sha256(folder / name) != want:
                return f"{name} differs from its checksum"
    file = folder / WEIGHTS_FILE
    if weights and file.is_file():
        try:
            return _nonfinite(load_file(file))
        except (SafetensorError, OSError, ValueError) as err:
            return f"{WEIGHTS_FILE} is unreadable ({err})"
    return None


def _nonfinite(state: dict[str, torch.Tensor]) -> str | None:
    bad = [name for name, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    return f"{WEIGHTS_FILE} holds non-finite values ({bad[0]})" if bad else None


def verify(folder: str | Path, weights: bool = True) -> None:
    """UserError when `folder` is damaged (see `damage`)."""
    if (why := damage(folder, weights)) is not None:
        raise UserError(f"checkpoint {folder} is damaged: {why}")
