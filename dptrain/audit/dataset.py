"""A prepared data folder for an audit: the base training split plus the canaries whose coin said "in".

The folder is an ordinary `PackedDataset` folder, so the real trainer trains on it unchanged.
Canaries are appended after the base sequences; Poisson sampling treats every index alike, so
their position does not matter. Each canary is one document (and, with groups, its own group), so
document- and group-level tables stay consistent. The eval split, tokenizer and the demo's
`canaries.json` (its planted secrets) are copied as is.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from dptrain.checkpoint import atomic_dir
from dptrain.data.fingerprint import content_fingerprint
from dptrain.data.packed import PackedDataset
from dptrain.data.prepare import DOCUMENT_DTYPE, GROUPS_FILE, MANIFEST, TOKEN_DTYPE
from dptrain.errors import UserError


def write_canary_dataset(base: str | Path, canaries: torch.Tensor, included: np.ndarray,
                         out: str | Path) -> Path:
    """Write `out` = the prepared folder `base` with canaries[included] appended to its train split."""
    train = PackedDataset(base, "train")
    if train.unit != "sequence":
        raise UserError(f"{base} is packed by {train.unit}; canary audits need data packed by sequence")
    canaries = torch.as_tensor(canaries)
    included = np.asarray(included, dtype=bool)
    if canaries.dim() != 2 or canaries.shape[1] != train.seq_len:
        raise UserError(f"canaries must be [m, {train.seq_len}] token tensors, got {tuple(canaries.shape)}")
    if included.shape != (canaries.shape[0],):
        raise UserError(f"need one inclusion flag per canary, got {included.size} for {canaries.shape[0]}")
    if canaries.numel() and (canaries.min() < 0 or canaries.max() >= train.vocab_size):
        raise UserError(f"canary token ids must lie in [0, {train.vocab_size})")
    added = canaries[torch.from_numpy(included)].numpy().astype(TOKEN_DTYPE)
    manifest = json.loads(json.dumps(train.manifest))
    info = manifest["splits"]["train"]
    n_base = len(train)
    doc_base = int(manifest["num_documents"])
    grouped = manifest.get("group_column") is not None

    with atomic_dir(Path(out)) as tmp:
        with open(tmp / info["tokens_file"], "wb") as f:
            for start in range(0, n_base, 65536):  # stream: the base split may not fit in memory
                np.asarray(train.tokens[start:start + 65536]).tofile(f)
            added.tofile(f)
        table = np.asarray(train.document_table)
        rows = [np.arange(doc_base, doc_base + len(added)),
                (n_base + np.arange(len(added))) * train.seq_len]
        if grouped:
            names = train.group_names
            rows.append(len(names) + np.arange(len(added)))
            (tmp / GROUPS_FILE).write_text(json.dumps(names + [f"audit-canary-{i}" for i in range(len(added))]) + "\n")
        np.concatenate([table, np.stack(rows, 1)]).astype(DOCUMENT_DTYPE).tofile(tmp / info["documents_file"])
        for name in [manifest["tokenizer"]["file"], "canaries.json", *(s["tokens_file"] for k, s in manifest["splits"].items()
                                                      if k != "train"),
                     *(s["documents_file"] for k, s in manifest["splits"].items() if k != "train")]:
            if (train.path / name).is_file():
                shutil.copy(train.path / name, tmp / name)
        info["num_sequences"] = n_base + len(added)
        info["num_tokens"] = int(info["num_tokens"]) + added.size
        info["num_documents"] = int(info["num_documents"]) + len(added)
        if "max_token_id" in info:  # none in folders prepared before it was stored
            info["max_token_id"] = max(int(info["max_token_id"]), int(added.max(initial=0)))
        manifest["num_documents"] = doc_base + len(added)
        if grouped:
            manifest["num_groups"] = int(manifest["num_groups"]) + len(added)
        manifest["audit"] = {"base": str(Path(base).resolve()), "base_train_sequences": n_base,
                             "canaries": int(canaries.shape[0]), "included": int(included.sum())}
        # What the audit spends, it spends on the base data: its own ledger records it.
        manifest["ledger_of"] = manifest["audit"]["base"]
        manifest["fingerprint"] = content_fingerprint(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return Path(out)
