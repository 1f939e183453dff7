"""Poisson sampling of batches: each example joins each batch independently with probability q.

This is the sampling the accountants analyse. Shuffling into fixed-size batches is a different
mechanism whose epsilon can be several times larger; nothing here shuffles.

Randomness (see `randomness`): a keyed sampler draws step t's batch from its own stream
("sampling", t), so it is a pure function of (secret, step), replayed exactly on resume and equal on
every rank; data parallelism then cuts it with `shard`, no rank samples on its own. A secure
sampler reads the OS CSPRNG: nobody, the run included, can replay it (it is single-process only).
"""
from __future__ import annotations

import numpy as np

from scipy import stats

from dptrain.errors import UserError
from dptrain.privacy.randomness import Streams, os_below, os_uniform


class PoissonSampler:
    """Batches of example indices drawn by (optionally truncated) Poisson sampling.

    `max_batch_size` truncates: a batch drawn larger is cut to a uniformly random subset of that
    size (as in VaultGemma; accounted by `accounting` with the dataset size and max batch size).
    An empty batch is a valid draw: the step must still happen, adding noise only.
    `seed` is an int or the run's `Streams`; a secure sampler ignores it.
    """

    def __init__(self, num_examples: int, expected_batch_size: int | float, seed: int | Streams | None,
                 max_batch_size: int | None = None, *, secure: bool = False) -> None:
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
        if not secure and seed is None:
            raise ValueError("a keyed sampler needs a seed (or Streams); or use secure=True")
        self.secure = bool(secure)
        self.streams = None if secure else (seed if isinstance(seed, Streams) else Streams(seed))
        self.steps_taken = 0
        self.truncated_steps = 0

    @property
    def sampling_rate(self) -> float:
        return self.expected_batch_size / self.num_examples

    def sample(self) -> np.ndarray:
        """Sorted int64 indices of the next batch."""
        indices, truncated = self.batch_at(self.steps_taken)
        self.truncated_steps += truncated
        self.steps_taken += 1
        return indices

    def batch_at(self, step: int) -> tuple[np.ndarray, bool]:
        """Step `step`'s batch (sorted int64) and whether it was truncated; moves nothing.
        Secure: a fresh CSPRNG draw at every call."""
        draw = _OsDraws() if self.secure else _KeyedDraws(self.streams.generator("sampling", step))
        # N independent Bernoulli(q) draws pick a subset whose size is Binomial(N, q) and which,
        # given its size k, is uniform over all k-subsets (every subset of size k has probability
        # q^k (1-q)^(N-k)). Drawing k first, then k distinct uniform indices, is the same
        # distribution in O(k) time and memory instead of O(N), which matters for N ~ 1e10.
        k = draw.binomial(self.num_examples, self.sampling_rate)
        indices = draw.distinct(self.num_examples, k)
        truncated = self.max_batch_size is not None and k > self.max_batch_size
        if truncated:
            indices = indices[draw.distinct(k, self.max_batch_size)]
        return np.sort(indices), truncated

    def state_dict(self) -> dict:
        """JSON-able state: where the run is, never the randomness (the stream key is the run's)."""
        return {"num_examples": self.num_examples, "expected_batch_size": self.expected_batch_size,
                "max_batch_size": self.max_batch_size, "secure": self.secure,
                "steps_taken": self.steps_taken, "truncated_steps": self.truncated_steps}

    def load_state_dict(self, state: dict) -> None:
        try:
            saved = (state["num_examples"], state["expected_batch_size"], state["max_batch_size"],
                     state["secure"])
            mine = (self.num_examples, self.expected_batch_size, self.max_batch_size, self.secure)
            if saved != mine:
                raise UserError("the sampler state was saved for (examples, expected batch, max "
                                f"batch, secure) = {saved}, not {mine}; resuming would change q")
            self.steps_taken = int(state["steps_taken"])
            self.truncated_steps = int(state["truncated_steps"])
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"corrupt sampler state: {e!r}") from None


class CyclicPoissonSampler:
    """Cyclic Poisson sampling, the sampling amplified BandMF is analysed for (dptrain.privacy.bandmf).

    Every example is put into one of b parts, uniformly at random and independently of the others
    (keyed stream ("partition", 0), or the OS CSPRNG when secure: then the parts are kept in the
    private state, since nothing could draw them again); step t draws Poisson at rate q_b = b·B/N
    from part t mod b only, so the expected batch is B. Independent parts matter: with a fixed split
    (by index, say) adding one example would move others between parts.
    """

    def __init__(self, num_examples: int, expected_batch_size: int | float, bands: int,
                 seed: int | Streams | None, *, secure: bool = False) -> None:
        if int(bands) != bands or not 1 <= bands <= 65535:
            raise UserError(f"bands (parts) must be an integer in [1, 65535], got {bands!r}")
        if bands * expected_batch_size > num_examples:
            raise UserError(f"{bands} bands need at least bands × expected batch = {bands * expected_batch_size} "
                            f"examples (each part must hold a batch), got {num_examples}")
        self.bands = int(bands)
        self._poisson = PoissonSampler(num_examples, expected_batch_size, seed, secure=secure)
        self.num_examples, self.expected_batch_size = self._poisson.num_examples, expected_batch_size
        self.secure, self.streams = self._poisson.secure, self._poisson.streams
        self.max_batch_size = None
        self.steps_taken = 0
        self.truncated_steps = 0
        self._dtype = np.uint8 if self.bands <= 255 else np.uint16
        self._parts = (os_below(self.bands, self.num_examples).astype(self._dtype) if self.secure
                       else self.streams.generator("partition", 0).integers(0, self.bands, self.num_examples,
                                                                             dtype=self._dtype))
        self._members: dict[int, np.ndarray] = {}

    @property
    def sampling_rate(self) -> float:
        """q_b: the rate within the part whose turn it is (what is accounted)."""
        return self.bands * self.expected_batch_size / self.num_examples

    def members(self, part: int) -> np.ndarray:
        if part not in self._members:
            self._members[part] = np.flatnonzero(self._parts == part).astype(np.int64)
        return self._members[part]

    def sample(self) -> np.ndarray:
        indices, _ = self.batch_at(self.steps_taken)
        self.steps_taken += 1
        return indices

    def batch_at(self, step: int) -> tuple[np.ndarray, bool]:
        """Step `step`'s batch (sorted int64), never truncated; moves nothing."""
        members = self.members(step % self.bands)
        draw = _OsDraws() if self.secure else _KeyedDraws(self.streams.generator("sampling", step))
        k = draw.binomial(len(members), self.sampling_rate)
        return np.sort(members[draw.distinct(len(members), k)]), False

    def state_dict(self) -> dict:
        state = {"num_examples": self.num_examples, "expected_batch_size": self.expected_batch_size,
                 "bands": self.bands, "secure": self.secure, "steps_taken": self.steps_taken,
                 "truncated_steps": 0}
        if self.secure:  # drawn from the OS once: the only copy (private state)
            state["parts"] = self._parts.tobytes()
        return state

    def load_state_dict(self, state: dict) -> None:
        saved = (state.get("num_examples"), state.get("expected_batch_size"), state.get("bands"), state.get("secure"))
        mine = (self.num_examples, self.expected_batch_size, self.bands, self.secure)
        if saved != mine:
            raise UserError("the sampler state was saved for (examples, expected batch, bands, secure) = "
                            f"{saved}, not {mine}; resuming would change the sampling")
        if self.secure:
            parts = np.frombuffer(state.get("parts") or b"", dtype=self._dtype)
            if parts.shape != (self.num_examples,) or (parts >= self.bands).any():
                raise UserError("corrupt sampler state: the parts of the cyclic Poisson sampling are missing")
            self._parts, self._members = parts, {}
        self.steps_taken = int(state["steps_taken"])


class _KeyedDraws:
    """Binomial and distinct indices from one step's keyed stream."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng

    def binomial(self, n: int, p: float) -> int:
        return int(self.rng.binomial(n, p))

    def distinct(self, n: int, k: int) -> np.ndarray:
        """k distinct indices uniform in [0, n). numpy's choice without replacement uses a
        set-based method (O(k)) when k is small relative to n."""
        return self.rng.choice(n, size=k, replace=False, shuffle=False).astype(np.int64)


class _OsDraws:
    """The same two draws from the OS CSPRNG."""

    @staticmethod
    def binomial(n: int, p: float) -> int:
        # Inversion: the smallest k with CDF(k) >= u, for a 53-bit uniform u.
        return int(stats.binom.ppf(os_uniform(1)[0], n, p))

    @staticmethod
    def distinct(n: int, k: int) -> np.ndarray:
        """k distinct indices uniform in [0, n): the first k distinct values of an i.i.d. uniform
        sequence form a uniform k-subset (by symmetry), found in O(k log k)."""
        seen = np.empty(0, dtype=np.int64)
        while len(seen) < k:
            draws = np.concatenate([seen, os_below(n, 2 * (k - len(seen)) + 16)])
            values, first = np.unique(draws, return_index=True)
            seen = draws[np.sort(first)]  # distinct values, in order of first appearance
        return seen[:k]


class UnitSampler:
    """Poisson sampling over privacy units (documents or users), then at most k sequences of each.

    Unit u owns the contiguous sequences `starts[u] .. starts[u] + counts[u] - 1`. Each unit joins a
    step with probability q = expected_units / number of units (a `PoissonSampler` over units, so
    accounted as Poisson at that rate); a sampled unit contributes min(k, its count) of its
    sequences, a uniformly random subset drawn afresh every time it is sampled (keyed stream
    ("unit-sequences", step), or the OS CSPRNG when secure). Nothing about the choice within a unit
    depends on other units, so adding or removing one unit changes only its own rows.
    """

    def __init__(self, starts, counts, expected_units: int | float, max_sequences_per_unit: int,
                 seed: int | Streams | None, *, secure: bool = False, bands: int = 1) -> None:
        self.starts = np.asarray(starts, dtype=np.int64).reshape(-1)
        self.counts = np.asarray(counts, dtype=np.int64).reshape(-1)
        if self.starts.shape != self.counts.shape or (self.counts < 1).any():
            raise UserError("every unit needs a start and at least one sequence")
        if int(max_sequences_per_unit) != max_sequences_per_unit or max_sequences_per_unit < 1:
            raise UserError(f"max sequences per unit must be a positive integer, got {max_sequences_per_unit}")
        self.k = int(max_sequences_per_unit)
        # units are sampled as examples are: Poisson, or cyclic Poisson over parts for BandMF
        self.units = (PoissonSampler(len(self.counts), expected_units, seed, secure=secure) if bands == 1 else
                      CyclicPoissonSampler(len(self.counts), expected_units, bands, seed, secure=secure))
        self.secure = self.units.secure

    @property
    def num_units(self) -> int:
        return self.units.num_examples

    @property
    def sampling_rate(self) -> float:
        return self.units.sampling_rate

    @property
    def steps_taken(self) -> int:
        return self.units.steps_taken

    @property
    def truncated_steps(self) -> int:
        return self.units.truncated_steps  # 0: unit batches are never truncated

    def sample(self) -> np.ndarray:
        """The next step's rows: int64 [sampled units, k], one row per unit (units sorted), its
        sequence indices sorted and padded with -1 when the unit has fewer than k."""
        rows = self.rows_at(self.units.steps_taken)
        self.units.steps_taken += 1
        return rows

    def rows_at(self, step: int) -> np.ndarray:
        """Step `step`'s rows (see `sample`); moves nothing. Secure: a fresh draw at every call."""
        units, _ = self.units.batch_at(step)
        draw = _OsDraws() if self.secure else _KeyedDraws(self.units.streams.generator("unit-sequences", step))
        rows = np.full((len(units), self.k), -1, dtype=np.int64)
        for row, u in enumerate(units):
            n = int(self.counts[u])
            chosen = np.arange(n) if n <= self.k else np.sort(draw.distinct(n, self.k))
            rows[row, :len(chosen)] = self.starts[u] + chosen
        return rows

    def state_dict(self) -> dict:
        return {**self.units.state_dict(), "max_sequences_per_unit": self.k,
                "num_sequences": int(self.counts.sum())}

    def load_state_dict(self, state: dict) -> None:
        mine = (self.k, int(self.counts.sum()))
        saved = (state.get("max_sequences_per_unit"), state.get("num_sequences"))
        if saved != mine:
            raise UserError(f"the sampler state was saved for (k, sequences) = {saved}, not {mine}")
        self.units.load_state_dict(state)


def shard(indices: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """This rank's contiguous share of a global batch (sizes differ by at most one)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of size {world_size}")
    return np.array_split(indices, world_size)[rank]
