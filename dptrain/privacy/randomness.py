"""Where a run's randomness comes from, and how one secret becomes many independent streams.

The (ε, δ) guarantee assumes the adversary sees everything a run publishes but not the randomness
that chose the batches and drew the noise. Three modes:

- secret (default): a fresh 256-bit secret from the OS entropy pool, kept only in the run's
  private state (`train_state.pt`); a resume replays it, so a resume is bit-exact.
- explicit seed (`runtime.seed`): reproducible experiments; private only while the seed is.
- secure (`privacy.secure_randomness`): sampling and noise read the OS CSPRNG directly; nothing
  can be replayed, not even by the run itself.

Streams: one Philox-4x64 key (128 bits, hashed from the secret by numpy's SeedSequence) and a
256-bit counter per stream, laid out as (block, step, rank << 32 | shard, purpose | generation << 32).
Philox is a bijection of the counter under a fixed key, so two distinct (purpose, generation,
step, rank, shard) never start at the same block, and a stream would have to draw 2^64 blocks to
run into the next one. Nothing passes through a 32-bit seed or a hash of a name.
"""
from __future__ import annotations

import os
import secrets

import numpy as np

from dptrain.errors import UserError

SECRET_BITS = 256
# Every purpose has a fixed number; a new purpose takes a new number, never a reused one.
PURPOSES = {"model-init": 1, "sampling": 2, "noise": 3, "unit-sequences": 4, "partition": 5}
_U32 = 1 << 32
_U64 = 1 << 64


def fresh_secret() -> int:
    """A new run secret from the OS entropy pool."""
    return secrets.randbits(SECRET_BITS)


class Streams:
    """Independent, replayable random streams keyed by (purpose, step, rank, shard).

    `generation` separates a continuation (`init_from`) from its parent even under the same secret.
    """

    def __init__(self, secret: int, generation: int = 0) -> None:
        if int(secret) != secret or secret < 0:
            raise UserError(f"seed must be a non-negative integer, got {secret}")
        if not 0 <= generation < _U32:
            raise UserError(f"generation must be in [0, 2^32), got {generation}")
        self.generation = int(generation)
        words = np.random.SeedSequence(int(secret)).generate_state(2, np.uint64)
        self.key = words  # 128 bits: the only thing derived from the secret

    def counter(self, purpose: str, step: int, rank: int = 0, shard: int = 0) -> np.ndarray:
        if purpose not in PURPOSES:
            raise ValueError(f"unknown random stream purpose {purpose!r}")
        if not (0 <= step < _U64 and 0 <= rank < _U32 and 0 <= shard < _U32):
            raise ValueError(f"stream index out of range: step {step}, rank {rank}, shard {shard}")
        return np.array([0, step, (rank << 32) | shard, PURPOSES[purpose] | (self.generation << 32)],
                        dtype=np.uint64)

    def bit_generator(self, purpose: str, step: int, rank: int = 0, shard: int = 0) -> np.random.Philox:
        return np.random.Philox(key=self.key, counter=self.counter(purpose, step, rank, shard))

    def generator(self, purpose: str, step: int, rank: int = 0, shard: int = 0) -> np.random.Generator:
        return np.random.Generator(self.bit_generator(purpose, step, rank, shard))

    def torch_seed(self, purpose: str) -> int:
        """A 63-bit seed for torch's global generator (model initialisation only: not private)."""
        return int(self.bit_generator(purpose, 0).random_raw() >> 1)


# ---- the OS CSPRNG, for secure mode -------------------------------------------------------------
def os_uniform(n: int) -> np.ndarray:
    """n uniforms on (0, 1] with 53 random bits each."""
    bits = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(11)
    return (bits.astype(np.float64) + 1.0) * 2.0**-53


def os_below(bound: int, n: int) -> np.ndarray:
    """n i.i.d. uniform integers in [0, bound) (bound < 2^63), without modulo bias."""
    if not 0 < bound < (1 << 63):
        raise ValueError(f"bound must be in (0, 2^63), got {bound}")
    limit = np.uint64((_U64 // bound) * bound - 1)  # accept x <= limit: an exact multiple of bound
    out = np.empty(0, dtype=np.uint64)
    while len(out) < n:
        draw = np.frombuffer(os.urandom(8 * (n - len(out) + 8)), dtype=np.uint64)
        out = np.concatenate([out, draw[draw <= limit]])
    return (out[:n] % np.uint64(bound)).astype(np.int64)
