"""The held-out loss: mean token cross-entropy on the eval split, which training never samples."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from dptrain.train.batches import IGNORE, inputs_and_targets


@torch.no_grad()
def heldout_loss(model, data, max_sequences: int, micro_batch_size: int, device, autocast) -> float:
    """Mean token cross-entropy over the first `max_sequences` held-out sequences."""
    model.eval()
    n = min(len(data), max_sequences)
    total, count = 0.0, 0
    for start in range(0, n, micro_batch_size):
        slots = np.arange(start, min(n, start + micro_batch_size), dtype=np.int64)
        inputs, targets = inputs_and_targets(data, slots, device)
        with autocast():
            logits = model(inputs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum",
                               ignore_index=IGNORE)
        total += loss.item()
        count += int((targets != IGNORE).sum())
    model.train()
    return total / max(count, 1)
