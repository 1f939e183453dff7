"""How one private step is split over processes: `none`, `ddp` or `fsdp` (runtime.parallel).

The global Poisson batch is drawn on every rank from the same stream (so every rank knows it), then
cut into contiguous shares; no rank samples on its own, so the single-process guarantee holds
whatever the world size. Each rank clips its own examples; the clipped sums are summed over ranks;
the Gaussian noise enters that sum exactly once per element:

- `ddp`: replicated weights, no DistributedDataParallel wrapper (its bucketed gradient hooks
  would all-reduce unclipped gradients). Rank 0 adds the noise to ITS clipped sum before a SUM
  all-reduce, so the sum carries one draw per element. Rank 0 uses the run's own noise stream,
  so a DDP run draws exactly the noise a single-process run draws, at any world size; and it
  works for secure noise, whose OS-entropy draws no two ranks could reproduce (the alternative,
  every rank adding an identical shared draw after the all-reduce, cannot).
- `fsdp`: `fully_shard` per decoder block and at the root; each rank owns a disjoint Shard(0)
  slice of every parameter. Two passes per micro-batch: the engine measures the exact
  per-example norms (its hooks see full activations and output-gradients), then an ordinary
  backward of sum_i c_i L_i, c_i = w_i min(1, C / ||g_i||), whose gradient IS the clipped sum,
  lets FSDP reduce-scatter it (SUM, not mean) into the sharded grads. Cost: a second forward and
  backward per micro-batch, about 2x the compute of the single-pass engine. Each rank then noises
  only its own slice, from the stream ("noise", step, rank) of the run's 128-bit Philox key (see
  dptrain.privacy.randomness): no two slices and no two steps share a stream, and the stream needs
  no saved state. Secure randomness: every rank reads the OS CSPRNG.

Document or group units (privacy.unit): shares and micro-batches are cut between units of k rows,
so each unit is clipped whole on one rank; fsdp's second pass gives each row its unit's coefficient.

Micro-batches: every rank runs the same number of them (from the largest share, known to all),
padding with weight-0 slots, because FSDP's all-gathers and reduce-scatters happen inside every
forward and backward. Under `ddp` the only collective is the final all-reduce, so a rank skips
micro-batches that hold only padding and still joins the all-reduce.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from dptrain.distributed.runtime import DistEnv, init_distributed, main_first
from dptrain.dp import DPEngine
from dptrain.dp.head import model_head_loss
from dptrain.errors import UserError
from dptrain.model import Decoder
from dptrain.privacy.mechanism import Mechanism, clip_coefficients
from dptrain.privacy.correlated import CorrelatedNoise
from dptrain.privacy.noise import NoiseSource
from dptrain.privacy.sampling import shard

MODES = ("none", "ddp", "fsdp")


class Parallel:
    """One process: the engine's own clipped sums and noise (the reference the others must match)."""

    mode = "none"
    lockstep = False  # must every rank run the same number of micro-batches?

    def __init__(self, env: DistEnv | None = None, device: torch.device = torch.device("cpu")):
        self.env = env or DistEnv(0, 1, 0)
        self.device = device

    @property
    def distributed(self) -> bool:
        return self.mode != "none"

    @property
    def is_main(self) -> bool:
        return self.env.is_main

    def main_first(self):
        return main_first(self.env if self.distributed else None)

    def prepare(self, model: nn.Module) -> nn.Module:
        return model

    def micro_batches(self, indices: np.ndarray, size: int, unit_size: int = 1) -> Iterator[np.ndarray]:
        """This rank's share of the global batch in slots of `size` (-1 = weight-0 padding).

        The batch is laid out as whole units of `unit_size` rows; the split keeps every unit on one
        rank and in one micro-batch (`size` is a multiple of `unit_size`), so each rank clips whole
        units exactly as one process would.
        """
        if size % unit_size or len(indices) % unit_size:
            raise ValueError(f"slots of {size} and a batch of {len(indices)} rows must hold whole units of {unit_size}")
        world = self.env.world_size
        units = indices.reshape(-1, unit_size)
        mine = shard(units, self.env.rank, world).reshape(-1)
        # the largest share's count, in micro-batches of size // unit_size units
        count = math.ceil(math.ceil(len(units) / world) / (size // unit_size))
        for start in range(0, count * size, size):
            chunk = mine[start:start + size]
            if not len(chunk) and not self.lockstep:
                break
            yield np.concatenate([chunk, np.full(size - len(chunk), -1, dtype=np.int64)])

    def clipped_grad_sum(self, engine: DPEngine, inputs: torch.Tensor, targets: torch.Tensor,
                         weights: torch.Tensor, unit_size: int = 1) -> torch.Tensor:
        return engine.clipped_grad_sum(inputs, targets, weights=weights, unit_size=unit_size)

    def privatize(self, engine: DPEngine, mechanism: Mechanism, noise: NoiseSource, step: int) -> None:
        """The step's noise, added once to the global clipped sum, and the division by B."""
        engine.privatize(mechanism, noise.for_step(step))

    def from_main(self, value):
        """`value` as rank 0 has it (a collective): for draws only rank 0 can make (OS entropy)."""
        if not self.distributed:
            return value
        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def gathered_on_main(self, value) -> list | None:
        """Every rank's `value`, by rank, on rank 0 (None elsewhere). A collective."""
        if not self.distributed:
            return [value]
        everyone = [None] * self.env.world_size if self.is_main else None
        dist.gather_object(value, everyone, dst=0)
        return everyone

    def check_agreement(self, facts: Callable[[], dict[str, str]]) -> None:
        """Stop every rank (UserError) when any rank's `facts()` differ from rank 0's. A collective;
        in one process `facts` is not even computed (a pass over every weight)."""
        if not self.distributed:
            return
        everyone: list = [None] * self.env.world_size
        dist.all_gather_object(everyone, facts())
        for name, value in everyone[0].items():
            ranks = [r for r, theirs in enumerate(everyone) if theirs.get(name) != value]
            if ranks:
                raise UserError(f"rank(s) {', '.join(map(str, ranks))} disagree with rank 0 on the {name} "
                                "before step 1: every rank must start from the same run state")

    def max(self, value: int) -> int:
        """The largest of every rank's `value` (a collective): e.g. whether any rank was asked to stop."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.long, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def total(self, count: int) -> int:
        """A count summed over ranks."""
        if not self.distributed:
            return count
        t = torch.tensor([count], dtype=torch.long, device=self.device)
        dist.all_reduce(t)
        return int(t.item())

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """The whole model's weights on CPU on rank 0 (None elsewhere). A collective."""
        return {k: v.detach().cpu() for k, v in model.state_dict().items()} if self.is_main else None

    def gathered_model(self, model: nn.Module) -> nn.Module | None:
        """A plain (unsharded) model with the whole weights on rank 0, None elsewhere. A collective."""
        return model if self.is_main else None

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def shutdown(self, clean: bool = True) -> None:
        """Leave the process group (at the end of a run).

        After a clean run every rank waits for the others first: a rank tearing Gloo down while a
        peer is still inside a collective aborts that peer. After an error there is no waiting, since
        the peers may be stuck in another collective and the launcher will stop them.
        """
        if self.distributed and dist.is_initialized():
            if clean:
                dist.barrier()
            dist.destroy_process_group()


class DataParallel(Parallel):
    mode = "ddp"

    def privatize(self, engine, mechanism, noise, step) -> None:
        # Only rank 0 adds noise (its stream is the one-process stream); dividing each share by B
        # before the SUM is the same linear map as dividing the sum.
        engine.privatize(mechanism, noise.for_step(step) if self.is_main else None)
        for p in engine.parameters:  # one tensor at a time: no flat copy of all gradients
            dist.all_reduce(p.grad)


class FullyShardedDP(Parallel):
    mode = "fsdp"
    lockstep = True

    def prepare(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FSDPModule, fully_shard

        for block in model.layers:
            fully_shard(block)
        fully_shard(model)  # the root: embeddings (tied with lm_head) and the final norm
        for module in model.modules():
            if isinstance(module, FSDPModule):
                # Reduce-scatter must SUM the clipped sums (FSDP averages by default). Forcing a
                # plain SUM op also keeps Gloo working (it has no pre-multiplied sum).
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)
        return model

    def clipped_grad_sum(self, engine, inputs, targets, weights, unit_size: int = 1) -> torch.Tensor:
        norms = engine.clipped_grad_sum(inputs, targets, weights=weights, accumulate=False, unit_size=unit_size)
        coef, finite = clip_coefficients(norms, weights, engine.max_grad_norm)
        # A unit's loss is the sum of its k rows' losses: each row takes its unit's coefficient,
        # so sum_rows c_unit(row) L_row = sum_units c_u L_u (padding rows have zero loss).
        coef, finite = coef.repeat_interleave(unit_size), finite.repeat_interleave(unit_size)
        # A non-finite example would turn the whole batch's gradient into NaN (0 * NaN): its rows
        # are replaced by padding tokens, which its zero coefficient then ignores.
        inputs = torch.where(finite[:, None].to(inputs.device), inputs, torch.zeros_like(inputs))
        # The clipped sum as the gradient of sum_i coef_i L_i, the head taken by chunks (no [B, T, V]
        # logits), under the caller's autocast if any.
        model_head_loss(engine.model, inputs, targets, reduce=True, weights=coef).backward()
        return norms

    def privatize(self, engine, mechanism, noise, step) -> None:
        if not isinstance(noise, (NoiseSource, CorrelatedNoise)):
            raise TypeError("fsdp derives its per-shard streams from the run's NoiseSource")
        # each rank noises its own slice, from its own stream
        engine.privatize(mechanism, noise.for_step(step, rank=self.env.rank), local=lambda g: g.to_local())

    def full_state_dict(self, model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if self.is_main else None

    def gathered_model(self, model):
        state = self.full_state_dict(model)
        if not self.is_main:
            return None
        plain = Decoder(model.cfg)
        plain.load_state_dict(state)
        return plain


def make_parallel(mode: str, device: torch.device) -> Parallel:
    """The strategy for runtime.parallel; joins the process group for ddp / fsdp."""
    if mode not in MODES:
        raise UserError(f"runtime.parallel must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "none":
        from dptrain.distributed.runtime import env_from_torchrun

        env = env_from_torchrun()
        if env is not None and env.world_size > 1:
            raise UserError(f"launched as {env.world_size} processes but runtime.parallel is none: "
                            "set runtime.parallel=ddp or fsdp")
        return Parallel(device=device)
    env, device = init_distributed(device)
    return (DataParallel if mode == "ddp" else FullyShardedDP)(env, device)
