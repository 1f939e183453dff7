"""Learning-rate schedules: linear warm-up, then cosine or exponential decay to a floor."""
from __future__ import annotations

import math

from dptrain.train.config import ScheduleConfig


def lr_multiplier(step: int, total_steps: int, cfg: ScheduleConfig) -> float:
    """The factor applied to the peak learning rate at optimizer step `step` (0-based)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.decay == "constant":
        return 1.0
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.min_lr_ratio
    if cfg.decay == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return floor ** progress  # exponential: from 1 down to the floor
