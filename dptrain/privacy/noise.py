"""Sources of i.i.d. standard normal noise for DP-SGD.

Default: a seeded torch CPU generator; noise is drawn in float32 on the CPU, then moved and cast
to the requested device and dtype. The stream is therefore the same on every device and for every
dtype, and the generator state can be saved and restored for a bit-exact resume. Its seed is
derived from the user seed under its own name, so it never coincides with the sampler's stream.

Secure (`secure=True`): bits from the operating system's CSPRNG and a sampler hardened against the
floating-point attack on Gaussian noise (see `_secure_normal`). It cannot be replayed, so it
cannot resume bit-for-bit; its state_dict holds no stream.
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np
import torch

from dptrain.errors import UserError
from dptrain.privacy.seeds import derive_seed

# Gaussians summed per secure output; see `_secure_normal`.
SECURE_SUMMANDS = 4
SECURE_CHUNK = 1 << 20


class NoiseSource:
    """`noise(shape, device, dtype)` returns a tensor of i.i.d. N(0, 1) draws."""

    def __init__(self, seed: int, secure: bool = False) -> None:
        self.seed = int(seed)
        self.secure = bool(secure)
        self._generator: torch.Generator | None = None
        if not self.secure:
            self._generator = torch.Generator(device="cpu")
            self._generator.manual_seed(derive_seed(self.seed, "gaussian-noise"))

    def __call__(self, shape: Sequence[int] | torch.Size, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
        shape = tuple(shape)
        if self.secure:
            # float64 in chunks, so the working memory stays bounded for billion-element tensors
            out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
            sample = torch.empty(math.prod(shape), dtype=out_dtype)
            for start in range(0, sample.numel(), SECURE_CHUNK):
                chunk = sample[start:start + SECURE_CHUNK]
                chunk.copy_(torch.from_numpy(_secure_normal(chunk.numel())))
            sample = sample.reshape(shape)
        else:
            sample = torch.randn(shape, generator=self._generator, dtype=torch.float32)
        return sample.to(device=device, dtype=dtype)

    def state_dict(self) -> dict:
        """JSON-able state; restoring it continues the default stream exactly."""
        state = {"seed": self.seed, "secure": self.secure}
        if self._generator is not None:
            state["generator"] = self._generator.get_state().tolist()
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("secure") != self.secure or state.get("seed") != self.seed:
            raise UserError(f"noise state is for seed {state.get('seed')} secure "
                            f"{state.get('secure')}, not seed {self.seed} secure {self.secure}")
        if self._generator is not None:
            try:
                self._generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
            except (KeyError, TypeError, ValueError, RuntimeError) as e:
                raise UserError(f"corrupt noise generator state: {e!r}") from None


def _secure_uniform(n: int) -> np.ndarray:
    """n uniforms on (0, 1] with 53 random bits each, from the OS CSPRNG."""
    bits = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(11)
    return (bits.astype(np.float64) + 1.0) * 2.0**-53


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
        u1, u2 = _secure_uniform(pairs), _secure_uniform(pairs)
        radius = np.sqrt(-2.0 * np.log(u1))
        angle = 2.0 * np.pi * u2
        z = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:n]
        total += z
    return total / math.sqrt(SECURE_SUMMANDS)
