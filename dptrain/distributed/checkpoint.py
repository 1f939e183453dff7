"""Distributed checkpoints: model + optimizer through torch.distributed.checkpoint (DCP).

Each rank writes its own shards into `<checkpoint>/dcp/`; rank 0 adds the run state (sampler,
noise, ledger, scheduler: JSON-able and identical on every rank) and the gathered full weights as
`model.safetensors`, so exports, audits and `load_model` read a distributed checkpoint like any
other. DCP stores tensors by name with their global shapes, so loading reshards to whatever world
size (or none) resumes the run. Folders are assumed to be on a file system every rank sees.
"""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

DCP_DIR = "dcp"


def has_dcp(path: Path) -> bool:
    return (path / DCP_DIR / ".metadata").is_file()


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Every rank calls this with the same folder; it writes this rank's shards."""
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=folder / DCP_DIR)


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Load into this rank's (possibly differently sharded) model and optimizer, in place."""
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    # A plain process (runtime.parallel none) reads the shards without a process group, as intended.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=folder / DCP_DIR, no_dist=not dist.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def staging_dir(final: Path) -> Path:
    """A temporary sibling every rank can name without talking to the others."""
    return final.with_name(f".{final.name}.tmp")


def publish(staging: Path, final: Path) -> None:
    """Rank 0: move a complete staging folder into place (one rename)."""
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
