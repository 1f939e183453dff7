"""Poisson sampling of batches: each example joins each batch independently with probability q.

This is the sampling the accountants analyse. Shuffling into fixed-size batches is a different
mechanism whose epsilon can be several times larger; nothing here shuffles.

Data parallelism: every rank builds a sampler from the same seed, so all ranks draw the same global
batch, then `shard` hands each rank its part. No rank samples on its own.
"""
from __future__ import annotations

import numpy as np

from dptrain.errors import UserError
from dptrain.privacy.seeds import derive_seed


class PoissonSampler:
    """Batches of example indices drawn by (optionally truncated) Poisson sampling.

    `max_batch_size` truncates: a batch drawn larger is cut to a uniformly random subset of that
    size (as in VaultGemma; accounted by `accounting` with the dataset size and max batch size).
    An empty batch is a valid draw: the step must still happen, adding noise only.
    """

    def __init__(self, num_examples: int, expected_batch_size: int | float, seed: int,
                 max_batch_size: int | None = None) -> None:
        if int(num_examples) != num_examples or num_examples <= 0:
            raise UserError(f"the data set needs at least one example, got {num_examples}")
        if not 0 < expected_batch_size <= num_examples:
            raise UserError(f"expected batch size must be in (0, {num_examples}] (the number of "
                            f"examples), got {expected_batch_size}")
        if max_batch_size is not None and (int(max_batch_size) != max_batch_size
                                           or max_batch_size < 1):
            raise UserError(f"max batch size must be a positive integer, got {max_batch_size}")
        self.num_examples = int(num_examples)
        self.expected_batch_size = expected_batch_size
        self.max_batch_size = None if max_batch_size is None else int(max_batch_size)
        self.seed = int(seed)
        self._rng = np.random.default_rng(derive_seed(self.seed, "poisson-sampling"))
        self.steps_taken = 0
        self.truncated_steps = 0

    @property
    def sampling_rate(self) -> float:
        return self.expected_batch_size / self.num_examples

    def sample(self) -> np.ndarray:
        """Sorted int64 indices of the next batch."""
        # N independent Bernoulli(q) draws pick a subset whose size is Binomial(N, q) and which,
        # given its size k, is uniform over all k-subsets (every subset of size k has probability
        # q^k (1-q)^(N-k)). Drawing k first, then k distinct uniform indices, is the same
        # distribution in O(k) time and memory instead of O(N), which matters for N ~ 1e10.
        k = int(self._rng.binomial(self.num_examples, self.sampling_rate))
        indices = self._distinct(self.num_examples, k)
        if self.max_batch_size is not None and k > self.max_batch_size:
            indices = indices[self._distinct(k, self.max_batch_size)]
            self.truncated_steps += 1
        self.steps_taken += 1
        return np.sort(indices)

    def _distinct(self, n: int, k: int) -> np.ndarray:
        """k distinct indices uniform in [0, n). numpy's choice without replacement uses a
        set-based method (O(k)) when k is small relative to n."""
        return self._rng.choice(n, size=k, replace=False, shuffle=False).astype(np.int64)

    def state_dict(self) -> dict:
        """JSON-able state for an exact resume (same configuration, same future batches)."""
        return {"num_examples": self.num_examples, "expected_batch_size": self.expected_batch_size,
                "max_batch_size": self.max_batch_size, "seed": self.seed,
                "steps_taken": self.steps_taken, "truncated_steps": self.truncated_steps,
                "rng": self._rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        try:
            saved = (state["num_examples"], state["expected_batch_size"], state["max_batch_size"],
                     state["seed"])
            mine = (self.num_examples, self.expected_batch_size, self.max_batch_size, self.seed)
            if saved != mine:
                raise UserError("the sampler state was saved for (examples, expected batch, max "
                                f"batch, seed) = {saved}, not {mine}; resuming would change q")
            self._rng.bit_generator.state = state["rng"]
            self.steps_taken = int(state["steps_taken"])
            self.truncated_steps = int(state["truncated_steps"])
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"corrupt sampler state: {e!r}") from None


def shard(indices: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """This rank's contiguous share of a global batch (sizes differ by at most one)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of size {world_size}")
    return np.array_split(indices, world_size)[rank]
