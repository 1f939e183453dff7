"""Independent random streams derived from one user seed.

Batch sampling and noise must never share a stream: noise correlated with the choice of batch
would void the analysis. Each purpose gets its own seed from numpy's SeedSequence, keyed by name.
"""
from __future__ import annotations

import zlib

import numpy as np

from dptrain.errors import UserError


def derive_seed(seed: int, purpose: str) -> int:
    """A 63-bit seed for `purpose`, independent of the seeds of other purposes."""
    if int(seed) != seed or seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed}")
    seq = np.random.SeedSequence(int(seed), spawn_key=(zlib.crc32(purpose.encode()),))
    return int(seq.generate_state(1, np.uint64)[0] >> np.uint64(1))
