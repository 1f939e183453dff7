"""Memorization measurements: the extraction test VaultGemma reports, and canary exposure.

Extraction test: for training sequences, feed the first `prefix_len` tokens, greedy-decode
`suffix_len` more, and compare with the true continuation. Exact match = every token equal;
approximate match = token-level Levenshtein distance <= `approx_threshold` * suffix_len.

Exposure (Carlini et al., "The Secret Sharer", USENIX Security 2019): a secret planted in the
training data is ranked by model log-likelihood among random candidates of the same format;
exposure = log2(#candidates) - log2(rank): log2(#candidates) when the secret is the most likely
candidate, about 1.44 on average for a secret the model never saw.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from itertools import islice
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from dptrain.errors import UserError
from dptrain.generate import check_token_ids, greedy_generate
from dptrain.model import Decoder
from dptrain.progress import progress_bar


def edit_distance(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> np.ndarray:
    """Levenshtein distance between rows of a [B, n] and b [B, k] (unit costs), vectorised over B.

    Row i of the DP table is computed at once: deletions and substitutions come from row i-1;
    the insertion chain new[j] = min(new[j-1] + 1, cand[j]) is a running minimum of cand[j] - j.
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(f"need two [B, n] arrays with the same B, got {a.shape} and {b.shape}")
    batch, k = a.shape[0], b.shape[1]
    cols = np.arange(k + 1)
    row = np.broadcast_to(cols, (batch, k + 1)).copy()  # distance from a[:, :0] to b[:, :j]
    for i in range(1, a.shape[1] + 1):
        cand = np.empty_like(row)
        cand[:, 0] = i
        cand[:, 1:] = np.minimum(row[:, 1:] + 1, row[:, :-1] + (a[:, i - 1:i] != b))
        row = np.minimum.accumulate(cand - cols, axis=1) + cols
    return row[:, -1]


def sample_windows(sequences: torch.Tensor, num: int, length: int, seed: int | None = None) -> torch.Tensor:
    """`num` windows of `length` tokens from distinct random rows of `sequences` [N, T], each at a
    random offset: the test's inputs when training sequences are longer than prefix + suffix."""
    n, t = sequences.shape
    if not 0 < num <= n:
        raise UserError(f"cannot sample {num} distinct sequences from {n}")
    if not 0 < length <= t:
        raise UserError(f"windows of {length} tokens do not fit in sequences of {t}")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    rows = torch.randperm(n, generator=generator)[:num]
    starts = torch.randint(0, t - length + 1, (num,), generator=generator)
    return sequences[rows[:, None], starts[:, None] + torch.arange(length)]


@dataclass
class MemorizationResult:
    """The extraction test's outcome; `to_dict()` embeds it in a privacy report."""
    num_sequences: int
    prefix_len: int
    suffix_len: int
    approx_threshold: float
    exact_matches: int
    approx_matches: int          # includes the exact ones
    exact_rate: float
    approx_rate: float
    normalized_distances: list[float] = field(repr=False)  # edit distance / suffix_len, per sequence

    def to_dict(self) -> dict:
        return asdict(self)


def memorization_test(model: Decoder, sequences: torch.Tensor, prefix_len: int = 50, suffix_len: int = 50,
                      approx_threshold: float = 0.1, batch_size: int = 16,
                      progress: bool = True) -> MemorizationResult:
    """Run the extraction test on the first prefix_len + suffix_len tokens of each row of
    `sequences` [N, >= prefix_len + suffix_len] (training sequences, sampled by the caller)."""
    if prefix_len <= 0 or suffix_len <= 0:
        raise UserError(f"prefix_len and suffix_len must be positive, got {prefix_len}, {suffix_len}")
    if not 0 <= approx_threshold < 1:
        raise UserError(f"approx_threshold must be in [0, 1), got {approx_threshold}")
    if sequences.dim() != 2 or sequences.shape[0] == 0 or sequences.shape[1] < prefix_len + suffix_len:
        raise UserError(f"need a non-empty [N, >= {prefix_len + suffix_len}] token tensor, "
                        f"got shape {tuple(sequences.shape)}")
    sequences = sequences[:, :prefix_len + suffix_len]
    was_training = model.training
    model.eval()
    distances = []
    try:
        for batch in progress_bar(sequences.split(batch_size), desc="memorization", disable=not progress):
            generated = greedy_generate(model, batch[:, :prefix_len], suffix_len)
            distances.append(edit_distance(generated.numpy(), batch[:, prefix_len:].numpy()))
    finally:
        model.train(was_training)
    dist = np.concatenate(distances)
    n = int(dist.size)
    exact = int((dist == 0).sum())
    # Integer comparison avoids float round-off at the boundary (5 edits of 50 is exactly 10%).
    approx = int((dist <= math.floor(approx_threshold * suffix_len + 1e-9)).sum())
    return MemorizationResult(n, prefix_len, suffix_len, approx_threshold, exact, approx, exact / n,
                              approx / n, (dist / suffix_len).tolist())


@torch.no_grad()
def continuation_log_likelihood(model: Decoder, context: torch.Tensor, continuations: torch.Tensor) -> np.ndarray:
    """log P(continuation | context) in nats, for one context [C] and candidates [R, S] -> [R]."""
    context = check_token_ids(model, context.reshape(-1), "context")
    continuations = check_token_ids(model, continuations, "candidate")
    if context.numel() == 0:
        raise UserError("exposure needs a non-empty context before the secret")
    c = context.numel()
    rows = torch.cat([context.expand(continuations.shape[0], c), continuations], dim=1).to(next(model.parameters()).device)
    if rows.shape[1] > model.cfg.max_seq_len:
        raise UserError(f"context + secret of {rows.shape[1]} tokens exceed max_seq_len {model.cfg.max_seq_len}")
    logp = F.log_softmax(model(rows)[:, c - 1:-1].float(), dim=-1)
    return logp.gather(-1, rows[:, c:, None]).squeeze(-1).sum(dim=1).double().cpu().numpy()


@dataclass
class ExposureResult:
    exposure: float          # log2(num_candidates) - log2(rank)
    rank: float              # 1 = the canary is the most likely candidate (ties count half)
    num_candidates: int      # references + the canary itself
    canary_log_likelihood: float

    def to_dict(self) -> dict:
        return asdict(self)


def exposure_from_log_likelihoods(canary: float, references: Iterable[float]) -> ExposureResult:
    """Exposure of a canary given its log-likelihood and those of reference candidates.

    rank = 1 + #references strictly more likely + half of those exactly as likely (a tie is a
    coin toss between exchangeable candidates).
    """
    refs = np.asarray(list(references), dtype=np.float64)
    if refs.size == 0:
        raise UserError("exposure needs at least one reference candidate")
    rank = 1 + float((refs > canary).sum()) + 0.5 * float((refs == canary).sum())
    total = refs.size + 1
    return ExposureResult(math.log2(total) - math.log2(rank), rank, total, float(canary))


def exposure(model: Decoder, context: torch.Tensor, secret: torch.Tensor,
             references: Iterable[torch.Tensor], num_references: int | None = None,
             batch_size: int = 256, progress: bool = False) -> ExposureResult:
    """Exposure of `secret` (token ids) following `context`, against reference secrets of the same
    length drawn from `references` (an iterable of id tensors; at most `num_references` are used).
    References equal to the secret are skipped: the canary is counted once, as itself."""
    secret = secret.reshape(-1).long()
    was_training = model.training
    model.eval()
    try:
        canary_ll = float(continuation_log_likelihood(model, context, secret[None])[0])
        it = iter(islice(references, num_references) if num_references is not None else references)
        scores = []
        with progress_bar(total=num_references, desc="exposure", disable=not progress) as bar:
            while chunk := [r.reshape(-1).long() for r in islice(it, batch_size)]:
                if any(r.numel() != secret.numel() for r in chunk):
                    raise UserError(f"every reference must have the secret's {secret.numel()} tokens")
                kept = [r for r in chunk if not torch.equal(r, secret)]
                if kept:
                    scores.append(continuation_log_likelihood(model, context, torch.stack(kept)))
                bar.update(len(chunk))
    finally:
        model.train(was_training)
    return exposure_from_log_likelihoods(canary_ll, np.concatenate(scores) if scores else [])


def random_secrets(length: int, vocab_size: int, seed: int | None = None, low: int = 0):
    """Endless uniformly random secrets of `length` token ids in [low, vocab_size): the reference
    space when the canary's secret was drawn the same way."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else torch.Generator()
    if seed is None:
        generator.seed()
    while True:
        yield torch.randint(low, vocab_size, (length,), generator=generator)
