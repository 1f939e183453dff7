"""Process-group set-up from torchrun's environment, and small rank-aware helpers.

torchrun (and `launch/`) export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. A run
asked to be parallel without them is a world of one on a free local port, so the same config
works under `python -m dptrain train` and under torchrun.
"""
from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from dptrain.errors import UserError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str) -> torch.device:
    """runtime.device: "auto" is CUDA when there is one; a CUDA name without CUDA is a UserError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"runtime.device is '{name}' but no CUDA device is available")
    return torch.device(name)


def env_from_torchrun() -> DistEnv | None:
    """The launcher's rank layout, or None when this process was not started by one."""
    if "WORLD_SIZE" not in os.environ:
        return None
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except (KeyError, ValueError) as err:
        raise UserError(f"torchrun environment is incomplete or not integer: {err}") from None
    if not 0 <= rank < world:
        raise UserError(f"RANK {rank} is outside WORLD_SIZE {world}")
    return DistEnv(rank, world, local)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: torch.device) -> tuple[DistEnv, torch.device]:
    """Join (or create) the default process group; return the layout and this rank's device.

    Backend: NCCL for CUDA, Gloo for CPU. On CUDA each rank takes the GPU of its LOCAL_RANK.
    """
    env = env_from_torchrun()
    if env is None:  # a world of one, e.g. FSDP on a single GPU without torchrun
        env = DistEnv(0, 1, 0)
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    if device.type == "cuda":
        if env.local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {env.local_rank} has no GPU ({torch.cuda.device_count()} visible)")
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                rank=env.rank, world_size=env.world_size)
    elif (dist.get_rank(), dist.get_world_size()) != (env.rank, env.world_size):
        raise RuntimeError("the existing process group disagrees with RANK / WORLD_SIZE")
    return env, device


@contextmanager
def main_first(env: DistEnv | None) -> Iterator[None]:
    """Rank 0 runs the block first (e.g. builds a shared data folder), then the others."""
    if env is not None and not env.is_main:
        dist.barrier()
    yield
    if env is not None and env.is_main:
        dist.barrier()
