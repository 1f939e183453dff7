"""Greedy decoding with a `Decoder`, for samples and memorization tests (no KV cache: small models)."""
from __future__ import annotations

import torch

from dptrain.model import Decoder


@torch.no_grad()
def greedy_generate(model: Decoder, prompt_ids: torch.Tensor, new_tokens: int,
                    eos_id: int | None = None) -> torch.Tensor:
    """Extend each row of `prompt_ids` [B, P] by `new_tokens` argmax tokens; returns [B, new_tokens].

    Rows that emit `eos_id` keep emitting it, so the result stays rectangular.
    """
    was_training = model.training
    model.eval()
    seq = prompt_ids
    done = torch.zeros(seq.shape[0], dtype=torch.bool, device=seq.device)
    for _ in range(new_tokens):
        window = seq[:, -model.cfg.max_seq_len:]
        nxt = model(window)[:, -1].argmax(-1)
        if eos_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            done |= nxt == eos_id
        seq = torch.cat([seq, nxt[:, None]], dim=1)
    model.train(was_training)
    return seq[:, prompt_ids.shape[1]:]
