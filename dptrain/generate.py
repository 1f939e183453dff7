"""Greedy decoding with a `Decoder`, for samples and memorization tests (no KV cache: small models)."""
from __future__ import annotations

import torch

from dptrain.errors import UserError
from dptrain.model import Decoder


@torch.no_grad()
def greedy_generate(model: Decoder, prefix: torch.Tensor, num_tokens: int,
                    eos_id: int | None = None) -> torch.Tensor:
    """Extend each row of `prefix` [B, P] by `num_tokens` argmax tokens; returns them [B, num_tokens].

    Rows that emit `eos_id` keep emitting it, so the result stays rectangular.
    """
    if prefix.shape[1] + num_tokens > model.cfg.max_seq_len:
        raise UserError(f"prefix {prefix.shape[1]} + {num_tokens} new tokens exceed "
                        f"max_seq_len {model.cfg.max_seq_len}")
    if prefix.numel() and (prefix.min() < 0 or prefix.max() >= model.cfg.vocab_size):
        raise UserError(f"prefix token ids must lie in [0, {model.cfg.vocab_size})")
    was_training = model.training
    model.eval()
    seq = prefix.long().to(next(model.parameters()).device)
    done = torch.zeros(seq.shape[0], dtype=torch.bool, device=seq.device)
    for _ in range(num_tokens):
        next_token = model(seq)[:, -1].argmax(dim=-1)
        if eos_id is not None:
            next_token = torch.where(done, torch.full_like(next_token, eos_id), next_token)
            done |= next_token == eos_id
        seq = torch.cat([seq, next_token[:, None]], dim=1)
    model.train(was_training)
    return seq[:, prefix.shape[1]:].cpu()
