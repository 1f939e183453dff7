"""Per-example language-model loss: the quantity whose gradient each example owns."""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def per_example_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """L_i = mean token cross-entropy over example i's non-ignored positions (0 if it has none).

    `logits[B, T, V]`, `targets[B, T]` with -100 marking ignored positions. Summing the result and
    calling backward gives each example's own output-gradients, unscaled by the batch.
    """
    b, t, v = logits.shape
    work = logits.to(torch.promote_types(logits.dtype, torch.float32))
    tokens = F.cross_entropy(work.reshape(b * t, v), targets.reshape(b * t),
                             ignore_index=IGNORE_INDEX, reduction="none").view(b, t)
    counts = (targets != IGNORE_INDEX).sum(1).clamp(min=1)
    return tokens.sum(1) / counts.to(tokens.dtype)
