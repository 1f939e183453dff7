"""Canaries for auditing: which ones go into training (fair coins), and how to score them after.

A score is any number that tends to be higher for canaries the model was trained on. Two scorers:
the negative per-sequence loss (needs only the final model), and the alignment of a canary's
gradient with the total weight change of training (needs the initial weights too).
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from dptrain.errors import UserError
from dptrain.model import Decoder
from dptrain.progress import progress_bar


def draw_inclusion(num_canaries: int, seed: int | None = None) -> np.ndarray:
    """One independent fair coin per canary: True = put it into the training data.

    Leave seed=None in a real audit (fresh OS entropy), so no one can predict the coins; the
    audit's validity rests on the coins being independent of everything else.
    """
    if num_canaries <= 0:
        raise UserError(f"num_canaries must be positive, got {num_canaries}")
    return np.random.default_rng(seed).integers(0, 2, size=num_canaries).astype(bool)


def random_canaries(num_canaries: int, seq_len: int, vocab_size: int, seed: int | None = None,
                    low: int = 0) -> torch.Tensor:
    """Sequences of uniformly random tokens in [low, vocab_size): unlike any natural text, so
    training on one visibly moves its loss. `low` skips special ids (pad, bos, ...)."""
    if not 0 <= low < vocab_size:
        raise UserError(f"need 0 <= low < vocab_size, got low={low}, vocab_size={vocab_size}")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return torch.randint(low, vocab_size, (num_canaries, seq_len), generator=generator)


def _check_tokens(model: Decoder, tokens: torch.Tensor) -> torch.Tensor:
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise UserError(f"canary tokens must be a [num, length >= 2] tensor, got shape {tuple(tokens.shape)}")
    if tokens.min() < 0 or tokens.max() >= model.cfg.vocab_size:
        raise UserError(f"canary token ids must lie in [0, {model.cfg.vocab_size})")
    if tokens.shape[1] > model.cfg.max_seq_len:
        raise UserError(f"canaries of {tokens.shape[1]} tokens exceed max_seq_len {model.cfg.max_seq_len}")
    return tokens.long()


def sequence_losses(model: Decoder, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each row of `tokens` [B, T] -> [B] (float32, with grad)."""
    logits = model(tokens)[:, :-1].float()
    nll = F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")
    return nll.mean(dim=1)


@torch.no_grad()
def loss_scores(model: Decoder, tokens: torch.Tensor, batch_size: int = 32,
                progress: bool = False) -> np.ndarray:
    """Score = -(mean next-token loss) of each canary under the model; higher = more memorised."""
    tokens = _check_tokens(model, tokens)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        out = [-sequence_losses(model, batch.to(device)).cpu()
               for batch in progress_bar(tokens.split(batch_size), desc="loss scores", disable=not progress)]
    finally:
        model.train(was_training)
    return torch.cat(out).double().numpy()


def weight_delta(initial: Mapping[str, torch.Tensor], final: Decoder) -> dict[str, torch.Tensor]:
    """final - initial for every trainable parameter (a tied head counts once)."""
    delta = {}
    for name, param in final.named_parameters():
        if name not in initial:
            raise UserError(f"initial weights lack '{name}'")
        delta[name] = param.detach() - initial[name].to(param.device, param.dtype)
    return delta


def gradient_alignment_scores(model: Decoder, tokens: torch.Tensor, delta: Mapping[str, torch.Tensor],
                              progress: bool = False) -> np.ndarray:
    """Score = -cos(grad of the canary's loss, final - initial weights).

    Gradient descent moves the weights against each trained example's gradient, so a canary that
    was trained on tends to have a gradient pointing away from the total update. Gradients are
    taken at `model`'s current weights (the initial ones give the cleanest signal). One backward
    pass per canary; nothing per-example is stored, so memory stays that of one gradient.
    """
    tokens = _check_tokens(model, tokens)
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    missing = [name for name, _ in params if name not in delta]
    if missing:
        raise UserError(f"weight delta lacks '{missing[0]}'")
    device = params[0][1].device
    delta_list = [delta[name].to(device, torch.float32) for name, _ in params]
    delta_norm = math.sqrt(sum(float(d.square().sum()) for d in delta_list))
    if delta_norm == 0:
        raise UserError("the weights did not change between the initial and final model")
    was_training = model.training
    model.eval()
    scores = np.empty(tokens.shape[0])
    try:
        for i in progress_bar(range(tokens.shape[0]), desc="gradient scores", disable=not progress):
            loss = sequence_losses(model, tokens[i:i + 1].to(device)).sum()
            grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
            dot, sq = 0.0, 0.0
            for g, d in zip(grads, delta_list):
                if g is not None:
                    dot += float((g.float() * d).sum())
                    sq += float(g.float().square().sum())
            scores[i] = -dot / (math.sqrt(sq) * delta_norm) if sq > 0 else 0.0
    finally:
        model.train(was_training)
    return scores
