"""The naive per-example loop: each example alone through autograd. Slow; the yardstick for tests
and benchmarks, written independently of the engine's algebra."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def unique_trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]  # parameters() drops tied aliases


def per_example_grads(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> list[list[torch.Tensor]]:
    """g_i for every example, as a list over parameters (see `unique_trainable`)."""
    params = unique_trainable(model)
    out = []
    for i in range(inputs.shape[0]):
        logits = model(inputs[i:i + 1])
        if (targets[i] != -100).any():
            loss = F.cross_entropy(logits[0].float() if logits.dtype != torch.float64 else logits[0],
                                   targets[i], ignore_index=-100, reduction="mean")
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            out.append([torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)])
        else:
            out.append([torch.zeros_like(p) for p in params])
    return out


def naive_clipped_grad_sum(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                           max_grad_norm: float, weights: torch.Tensor | None = None):
    """(norms[B], clipped sum per parameter) by the definition."""
    params = unique_trainable(model)
    grads = per_example_grads(model, inputs, targets)
    dtype = torch.float64 if params[0].dtype == torch.float64 else torch.float32
    return _clip_and_sum(params, grads, dtype, max_grad_norm, weights)


def _clip_and_sum(params, grads: list, dtype, max_grad_norm: float, weights):
    """(norms, sum_i w_i min(1, C / ||g_i||) g_i) of per-example (or per-unit) gradients `grads`."""
    norms = torch.stack([torch.sqrt(sum(g.to(dtype).pow(2).sum() for g in gs)) for gs in grads])
    w = torch.ones(len(grads), dtype=dtype) if weights is None else weights.to(dtype)
    coef = w * torch.clamp(max_grad_norm / norms, max=1.0)
    total = [torch.zeros_like(p) for p in params]
    for c, gs in zip(coef, grads):
        for t, g in zip(total, gs):
            t.add_(c.to(g.dtype) * g)
    return norms, total


def naive_unit_clipped_grad_sum(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                                max_grad_norm: float, unit_size: int, weights: torch.Tensor | None = None):
    """(norms[B/k], clipped sum per parameter) for units of `unit_size` consecutive rows: each
    unit's rows go through autograd together and its gradient is that of the sum of their mean
    token losses (a row with every target ignored adds nothing), clipped as one vector."""
    params = unique_trainable(model)
    dtype = torch.float64 if params[0].dtype == torch.float64 else torch.float32
    grads = []
    for start in range(0, inputs.shape[0], unit_size):
        rows = slice(start, start + unit_size)
        logits = model(inputs[rows])
        logits = logits if logits.dtype == torch.float64 else logits.float()
        loss = sum(F.cross_entropy(logits[r], targets[rows][r], ignore_index=-100, reduction="mean")
                   for r in range(logits.shape[0]) if (targets[rows][r] != -100).any())
        if torch.is_tensor(loss):
            gs = torch.autograd.grad(loss, params, allow_unused=True)
            gs = [torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)]
        else:
            gs = [torch.zeros_like(p) for p in params]
        grads.append(gs)
    return _clip_and_sum(params, grads, dtype, max_grad_norm, weights)
