"""A run's checkpoints: written atomically, found again, checked against the config, and read.

A checkpoint folder holds the weights (`model.safetensors`, `config.yaml`), the run's config, the
ledger the weights carry (`privacy_ledger.json`), the report and the tokenizer: all public. The
private state (`train_state.pt`: the run's secret, optimizer, sampler, private statistics) is
written owner-only (0600) and is never to be shared. ddp / fsdp runs add DCP shards (see
dptrain.distributed.checkpoint).
"""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from dptrain import configio
from dptrain.checkpoint import WEIGHTS_FILE, atomic_dir, damage, write_checksums, write_model
from dptrain.distributed import checkpoint as dist_checkpoint
from dptrain.errors import UserError
from dptrain.privacy.private_files import make_private
from dptrain.train.run_folder import TRAIN_CONFIG_FILE

STATE_FILE = "train_state.pt"
# Sections that decide what was trained and with which guarantee: a resume must not change them.
FIXED_ON_RESUME = ("model", "data", "privacy", "optimizer", "schedule", "init_from")


def load_state(file: Path) -> dict:
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: say which, not a pickle traceback
        raise UserError(f"{file} is corrupt ({type(err).__name__})") from None


def latest(root: Path) -> Path | None:
    done = sorted(c for c in root.glob("step-*") if (c / STATE_FILE).is_file())
    return done[-1] if done else None


def latest_intact(root: Path) -> Path | None:
    """The newest checkpoint whose files match their checksums and whose weights are finite. A
    damaged one is set aside (renamed `damaged-step-*`, never deleted), with one line saying so."""
    while (path := latest(root)) is not None:
        why = damage(path)
        if why is None:
            return path
        aside = path.with_name(f"damaged-{path.name}-{int(time.time())}")
        path.rename(aside)
        print(f"dptrain: checkpoint {path} is damaged ({why}): set aside as {aside.name}; "
              "resuming from the newest intact one", file=sys.stderr)
    return None


def remove_leftovers(root: Path) -> None:
    """Temporary folders of checkpoint writes a crash interrupted (`.step-*.tmp*`, `.step-*.old-*`)."""
    for leftover in root.glob(".step-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def check_resumable(path: Path, cfg) -> None:
    """Refuse a checkpoint written under another model, data, privacy plan or seed."""
    saved = configio.read_yaml(path / TRAIN_CONFIG_FILE)
    current = configio.to_dict(cfg)
    for section in FIXED_ON_RESUME:
        if saved.get(section) != current.get(section):
            raise UserError(f"{path} was written with a different '{section}' section: use a new "
                            f"out_dir, or restore the config it was trained with")
    if saved["runtime"]["seed"] != current["runtime"]["seed"]:
        raise UserError(f"{path} was written with runtime.seed {saved['runtime']['seed']}")


class Checkpointer:
    """Writes `root/step-NNNNNNNN` folders for a run, keeping the last `keep_last`."""

    def __init__(self, root: Path, parallel, keep_last: int) -> None:
        self.root, self.parallel, self.keep_last = root, parallel, keep_last

    def save(self, step: int, model, optimizer, state: dict, public: Callable[[Path], None]) -> Path:
        """`state`: the private run state (optimizer added here where it is not sharded);
        `public(folder)` writes the public files beside the weights."""
        path = self.root / f"step-{step:08d}"
        try:
            if self.parallel.distributed:
                return self._save_distributed(path, model, optimizer, state, public)
            with atomic_dir(path) as tmp:
                write_model(model, tmp)
                self._write_state(tmp, {**state, "optimizer": optimizer.state_dict()}, public)
        except (OSError, SafetensorError) as err:  # disk full, quota, permissions
            raise UserError(f"cannot write checkpoint {path} ({err}); the earlier checkpoints are intact: "
                            "free space and run the same command again to resume") from None
        self._drop_old()
        return path

    def _save_distributed(self, path, model, optimizer, state, public) -> Path:
        """Model + optimizer shards from every rank via DCP; the rest from rank 0."""
        tmp = dist_checkpoint.staging_dir(path)
        if self.parallel.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.parallel.barrier()
        dist_checkpoint.save_sharded(model, optimizer, tmp)
        whole = self.parallel.gathered_model(model)
        if self.parallel.is_main:
            write_model(whole, tmp)
            self._write_state(tmp, state, public)
            dist_checkpoint.publish(tmp, path)
            self._drop_old()
        self.parallel.barrier()
        return path

    @staticmethod
    def _write_state(folder: Path, state: dict, public: Callable[[Path], None]) -> None:
        file = folder / STATE_FILE
        file.touch(mode=0o600)
        make_private(file)  # owner-only before a byte of the secret is in it
        torch.save(state, file)
        public(folder)
        write_checksums(folder)  # last: covers every file above (and the DCP shards)

    def _drop_old(self) -> None:
        for old in sorted(self.root.glob("step-*"))[:-self.keep_last]:
            shutil.rmtree(old)


def load_weights(path: Path, model, optimizer, state: dict, mode: str) -> None:
    """The checkpoint's weights (and optimizer) into this run's model, whatever its layout."""
    if dist_checkpoint.has_dcp(path):  # written by ddp / fsdp: DCP reshards to this world
        dist_checkpoint.load_sharded(model, optimizer, path)
    elif mode == "fsdp":
        raise UserError(f"{path} was written by a single-process run: resume it with "
                        "runtime.parallel none or ddp")
    else:  # checked by `latest_intact` (checksums, finite weights): read once, into this model
        model.load_unique_state_dict(load_file(path / WEIGHTS_FILE))
        optimizer.load_state_dict(state["optimizer"])
