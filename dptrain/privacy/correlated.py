"""Correlated noise w = C⁻¹z from the run's i.i.d. noise, for a lower-triangular Toeplitz strategy C.

The shared part of BandMF's and BLT's noise (dptrain.privacy.bandmf, dptrain.privacy.blt): each
step's noise is drawn exactly once, in order; the i-th tensor a step noises is correlated with the
i-th of earlier steps through buffers kept per tensor. The buffers are the mechanism's state: kept
in the private checkpoint state (a resume continues the same C⁻¹z exactly) and secret like the noise.
"""
from __future__ import annotations

import itertools

import numpy as np

from dptrain.errors import UserError


def noise_error(h: np.ndarray) -> float:
    """‖S H‖²_F for the lower-triangular Toeplitz H with first column h: the summed noise variance of
    every SGD iterate per unit of (σC)², the workload BandMF's and BLT's strategies are chosen for."""
    steps = len(h)
    cumulative = np.cumsum(h)
    return float(np.sum((steps - np.arange(steps)) * cumulative ** 2))


class CorrelatedNoise:
    BUFFERS_KEY = "buffers"  # the buffers' name in the state dict

    def __init__(self, source) -> None:
        self.source = source
        self.secure = source.secure
        self.next_step = 0
        self._buffers: list[list] = []  # per noised tensor

    # ---- what a strategy defines ----------------------------------------------------------------
    def strategy_state(self) -> dict:
        """What identifies the strategy; a checkpoint drawn for another is refused."""
        raise NotImplementedError

    def _new_buffers(self, w) -> list:
        raise NotImplementedError

    def _correlate(self, w, buffers: list) -> None:
        """Turn the draw z (in w, float32) into this step's noise in place, and update `buffers`."""
        raise NotImplementedError

    # ---- shared -----------------------------------------------------------------------------------
    def for_step(self, step: int, rank: int = 0):
        if step != self.next_step:
            raise RuntimeError(f"correlated noise asked for step {step} after step {self.next_step - 1}: "
                               "each step's noise is drawn exactly once, in order")
        self.next_step += 1
        draw = self.source.for_step(step, rank)
        calls = itertools.count()

        def noise(shape, device="cpu", dtype=None):
            import torch

            i = next(calls)
            w = draw(shape, device, torch.float32)
            if i == len(self._buffers):
                self._buffers.append(self._new_buffers(w))
            self._correlate(w, self._buffers[i])
            return w if dtype is None else w.to(dtype)

        return noise

    def buffer_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for b in self._buffers for t in b)

    def state_dict(self) -> dict:
        return {"next_step": self.next_step, **self.strategy_state(),
                self.BUFFERS_KEY: [[t.detach().cpu() for t in b] for b in self._buffers]}

    def load_state_dict(self, state: dict) -> None:
        saved = {k: v for k, v in state.items() if k not in ("next_step", self.BUFFERS_KEY)}
        if saved != self.strategy_state():
            # also what a checkpoint of a DP-SGD run (no state) gets: a mechanism cannot change mid-run;
            # nor can its form (buffers under secure randomness, regenerated from keyed streams)
            raise UserError("the checkpoint's correlated noise was drawn for another strategy matrix, or kept in "
                            "another form (secure randomness stores what keyed streams regenerate): use a new out_dir")
        self.next_step = int(state["next_step"])
        self._buffers = [list(b) for b in state[self.BUFFERS_KEY]]
