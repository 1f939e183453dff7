"""What a guarantee for one packed sequence means for a document or a user (group privacy).

A unit that spans k sequences is protected at group size k. The conversion used is the standard
one for (ε, δ)-DP (Dwork & Roth 2014, Theorem 2.2 applied k times): (k ε, k e^{(k-1) ε} δ). It is
valid for any mechanism, and loose; δ grows fast with k, which is the honest message: a document
or user spread over many sequences is barely protected by a sequence-level guarantee.
"""
from __future__ import annotations

import math

import numpy as np


def group_privacy(epsilon: float, delta: float, k: int) -> tuple[float, float]:
    """(ε, δ) for a group of k units from (ε, δ) for one; δ is capped at 1 (no guarantee)."""
    if k < 1:
        raise ValueError(f"group size must be at least 1, got {k}")
    if k == 1:
        return epsilon, delta
    log_delta = math.log(k) + (k - 1) * epsilon + math.log(delta)
    return k * epsilon, 1.0 if log_delta >= 0 else math.exp(log_delta)


def sequence_spans(starts: np.ndarray, num_tokens: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """First and last sequence index touched by each document, from its start token (in packing
    order; a document ends where the next starts, the last at `num_tokens`)."""
    starts = np.asarray(starts, dtype=np.int64)
    ends = np.append(starts[1:], num_tokens)  # exclusive
    return starts // seq_len, (ends - 1) // seq_len


def sequences_per_unit(data) -> dict:
    """Largest and mean number of training sequences per document and, with groups, per group."""
    table = np.asarray(data.document_table)
    num_tokens = len(data) * data.seq_len
    out = {}
    if not len(table):
        return out
    first, last = sequence_spans(table[:, 1], num_tokens, data.seq_len)
    per_doc = last - first + 1
    out["document"] = {"max": int(per_doc.max()), "mean": float(per_doc.mean()), "count": len(per_doc)}
    if table.shape[1] > 2:
        # Distinct (group, sequence) pairs: a sequence holding two documents of a group counts once.
        groups = np.repeat(table[:, 2], per_doc)
        seqs = np.repeat(first, per_doc) + (np.arange(per_doc.sum()) - np.repeat(np.cumsum(per_doc) - per_doc, per_doc))
        pairs = np.unique(np.stack([groups, seqs], axis=1), axis=0)
        per_group = np.bincount(np.unique(pairs[:, 0], return_inverse=True)[1])
        out["group"] = {"max": int(per_group.max()), "mean": float(per_group.mean()), "count": len(per_group)}
    return out


def group_guarantees(epsilon: float, delta: float, sizes) -> list[dict]:
    """Group-privacy (ε, δ) for each group size in `sizes`: computed from the guarantee alone, so
    the report can release it without saying how many sequences any real document or user spans."""
    return [dict(zip(("size", "epsilon", "delta"), (k, *group_privacy(epsilon, delta, k)))) for k in sizes]


def unit_guarantees(epsilon: float, delta: float, units: dict) -> dict:
    """The report section: sequences per unit and the group-privacy (ε, δ) of the largest unit."""
    section = {}
    for name, stats in units.items():
        eps, dlt = group_privacy(epsilon, delta, stats["max"])
        section[name] = {"sequences_max": stats["max"], "sequences_mean": round(stats["mean"], 3),
                         "units": stats["count"], "epsilon_of_largest": eps, "delta_of_largest": dlt}
    return section
