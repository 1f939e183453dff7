"""Sources of i.i.d. standard normal noise for DP-SGD, one stream per (step, rank, shard).

Keyed (default): step t's noise on rank r comes from the Philox stream ("noise", t, r) of the run's
`Streams` (see `randomness`): a pure function of (secret, step, rank), so a resume replays it
bit-for-bit with no saved generator state, and no two steps or ranks share a stream. Noise is drawn
in float32 on the CPU, then moved and cast, so the stream is the same on every device and dtype.

Secure (`secure=True`): bits from the operating system's CSPRNG and a sampler hardened against the
floating-point attack on Gaussian noise (see `_secure_normal`). Nothing can replay it.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

from dptrain.privacy.randomness import Streams, os_uniform

# Gaussians summed per secure output; see `_secure_normal`.
SECURE_SUMMANDS = 4
SECURE_CHUNK = 1 << 20

Noise = Callable[..., torch.Tensor]  # noise(shape, device="cpu", dtype=torch.float32)


class NoiseSource:
    """`for_step(step, rank)` returns the noise function of one step on one rank: successive calls
    `noise(shape, device, dtype)` give successive i.i.d. N(0, 1) tensors of that step's stream.

    Calling the source itself draws from the stream of step 0 (one stream, for standalone use).
    A secure source ignores `seed`.
    """

    def __init__(self, seed: int | Streams | None = None, secure: bool = False) -> None:
        if not secure and seed is None:
            raise ValueError("keyed noise needs a seed (or Streams); or use secure=True")
        self.secure = bool(secure)
        self.streams = None if secure else (seed if isinstance(seed, Streams) else Streams(seed))
        self._single: Noise | None = None

    def __call__(self, shape: Sequence[int] | torch.Size, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self._single is None:
            self._single = self.for_step(0)
        return self._single(shape, device, dtype)

    def state_dict(self) -> dict:
        """Nothing: a keyed step's noise is a function of the secret and the step (secure: of nothing)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def buffer_bytes(self) -> int:
        """Memory the noise keeps between steps: none (correlated noise keeps buffers)."""
        return 0

    def for_step(self, step: int, rank: int = 0) -> Noise:
        if self.secure:
            return _secure_tensor
        rng = self.streams.generator("noise", step, rank)

        def noise(shape: Sequence[int] | torch.Size, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
            sample = torch.from_numpy(rng.standard_normal(tuple(shape), dtype=np.float32))
            return sample.to(device=device, dtype=dtype)

        return noise


def _secure_tensor(shape: Sequence[int] | torch.Size, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    # float64 in chunks, so the working memory stays bounded for billion-element tensors
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    sample = torch.empty(math.prod(tuple(shape)), dtype=out_dtype)
    for start in range(0, sample.numel(), SECURE_CHUNK):
        chunk = sample[start:start + SECURE_CHUNK]
        chunk.copy_(torch.from_numpy(_secure_normal(chunk.numel())))
    return sample.reshape(tuple(shape)).to(device=device, dtype=dtype)


def _secure_normal(n: int) -> np.ndarray:
    """n i.i.d. N(0, 1) draws (float64) resistant to the floating-point attack.

    The attack (Mironov 2012 for Laplace; Jin et al. 2021, arXiv 2112.05307, for Gaussians):
    a textbook floating-point sampler reaches only a sparse, input-dependent set of values, so the
    exact bits of a noisy output can reveal the unnoised value. Mitigation as in Holohan & Braghin
    2021 (arXiv 2107.10138) and Opacus's secure mode: every output is the sum of several
    independent Gaussians scaled back to unit variance, X = (Z_1 + ... + Z_4) / 2. Each Z comes
    from Box-Muller in float64 on 53-bit CSPRNG uniforms, so the set of reachable sums is dense
    at float64 resolution, far finer than the float32 the noise is used in; no output value
    singles out the noiseless input. Unpredictable bits also stop an attacker who would
    otherwise replay a seeded generator.
    """
    total = np.zeros(n, dtype=np.float64)
    pairs = (n + 1) // 2
    for _ in range(SECURE_SUMMANDS):
        u1, u2 = os_uniform(pairs), os_uniform(pairs)
        radius = np.sqrt(-2.0 * np.log(u1))
        angle = 2.0 * np.pi * u2
        z = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:n]
        total += z
    return total / math.sqrt(SECURE_SUMMANDS)
