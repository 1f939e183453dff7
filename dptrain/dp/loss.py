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


def token_scale(targets: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, T] weight of each token in its example's mean: 1 / (non-ignored count), 0 if ignored."""
    valid = targets != IGNORE_INDEX
    counts = valid.sum(1, keepdim=True).clamp(min=1).to(dtype)
    return valid.to(dtype) / counts


def token_losses_and_grads(z: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor):
    """Cross-entropy of rows of logits z [n, V] (float32/64) against targets [n] (-100: ignored),
    times scale [n]: (scaled token losses [n], their gradient d/dz [n, V]).

    The same operations as `F.cross_entropy` and its backward (log-softmax, then exp(log-softmax)
    times the scale, minus the scale at the target), so the chunked head's output-gradients agree
    with autograd's through `per_example_loss` to the last bit or so.
    """
    valid = (targets != IGNORE_INDEX).unsqueeze(1)
    index = targets.clamp(min=0).unsqueeze(1)
    logp = torch.log_softmax(z, dim=-1)
    losses = -logp.gather(1, index).squeeze(1).masked_fill(~valid.squeeze(1), 0) * scale
    grad = logp.exp_().mul_(scale.unsqueeze(1))
    grad.scatter_add_(1, index, -scale.unsqueeze(1))
    return losses, grad.masked_fill_(~valid, 0)  # no 0 * inf at ignored rows
