"""Decoding with a `Decoder`, for samples and memorization tests (no KV cache: small models)."""
from __future__ import annotations

from typing import Callable

import torch

from dptrain.errors import UserError
from dptrain.model import Decoder


def check_token_ids(model: Decoder, ids: torch.Tensor, what: str) -> torch.Tensor:
    """`ids` as int64, or a UserError when one lies outside the model's vocabulary."""
    if ids.numel() and (ids.min() < 0 or ids.max() >= model.cfg.vocab_size):
        raise UserError(f"{what} token ids must lie in [0, {model.cfg.vocab_size})")
    return ids.long()


@torch.no_grad()
def _extend(model: Decoder, prefix: torch.Tensor, num_tokens: int, eos_id: int | None,
            pick: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    if prefix.shape[1] + num_tokens > model.cfg.max_seq_len:
        raise UserError(f"prefix {prefix.shape[1]} + {num_tokens} new tokens exceed "
                        f"max_seq_len {model.cfg.max_seq_len}")
    was_training = model.training
    model.eval()
    seq = check_token_ids(model, prefix, "prefix").to(next(model.parameters()).device)
    done = torch.zeros(seq.shape[0], dtype=torch.bool, device=seq.device)
    for _ in range(num_tokens):
        next_token = pick(model(seq)[:, -1].float())
        if eos_id is not None:  # a finished row keeps emitting EOS, so the result stays rectangular
            next_token = torch.where(done, torch.full_like(next_token, eos_id), next_token)
            done |= next_token == eos_id
        seq = torch.cat([seq, next_token[:, None]], dim=1)
    model.train(was_training)
    return seq[:, prefix.shape[1]:].cpu()


def greedy_generate(model: Decoder, prefix: torch.Tensor, num_tokens: int,
                    eos_id: int | None = None) -> torch.Tensor:
    """Extend each row of `prefix` [B, P] by `num_tokens` argmax tokens; returns them [B, num_tokens]."""
    return _extend(model, prefix, num_tokens, eos_id, lambda logits: logits.argmax(dim=-1))


def sample_generate(model: Decoder, prefix: torch.Tensor, num_tokens: int, temperature: float = 0.8,
                    seed: int = 0, eos_id: int | None = None) -> torch.Tensor:
    """Like `greedy_generate`, drawing each token from softmax(logits / temperature), seeded."""
    if temperature <= 0:
        raise UserError(f"temperature must be positive, got {temperature}")
    generator = torch.Generator().manual_seed(seed)

    def pick(logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits.cpu() / temperature, dim=-1)
        return torch.multinomial(probs, 1, generator=generator)[:, 0].to(logits.device)

    return _extend(model, prefix, num_tokens, eos_id, pick)
