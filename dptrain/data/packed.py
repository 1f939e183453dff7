"""Read a prepared folder: fixed-length token sequences from a memory map, O(1) per sequence."""
from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from dptrain.data.fingerprint import content_fingerprint
from dptrain.data.prepare import DOCUMENT_DTYPE, FORMAT, GROUPS_FILE, MANIFEST, TOKEN_DTYPE
from dptrain.errors import UserError


class PackedDataset:
    """One split ("train" or "eval") of a prepared folder.

    `ds[i]` is a uint32 array of `seq_len` tokens read through `np.memmap` (nothing is loaded up
    front); `ds.batch(indices)` is a `torch.LongTensor[B, seq_len]`. Indices are int64, so any
    number of sequences that fits on disk is addressable.
    """

    def __init__(self, path: str | Path, split: str = "train"):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise UserError(f"{self.path} is not a prepared data folder (no {MANIFEST}); "
                            f"run `dptrain data prepare` first")
        try:
            self.manifest: dict = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"{manifest_path} is corrupt ({err})") from None
        if self.manifest.get("format") != FORMAT:
            raise UserError(f"{manifest_path} is not a {FORMAT} manifest")
        splits = self.manifest["splits"]
        if split not in splits:
            raise UserError(f"{self.path} has no {split!r} split (has: {', '.join(splits)})")
        self.split = split
        self.info: dict = splits[split]
        self.seq_len: int = int(self.manifest["seq_len"])
        self.vocab_size: int = int(self.manifest["vocab_size"])
        self.held_out: bool = bool(self.info["held_out"])
        self.tokenizer_path = self.path / self.manifest["tokenizer"]["file"]
        n = int(self.info["num_sequences"])
        tokens = self.path / self.info["tokens_file"]
        expected = n * self.seq_len * np.dtype(TOKEN_DTYPE).itemsize
        if not tokens.is_file() or tokens.stat().st_size != expected:
            raise UserError(f"{tokens} is missing or truncated (expected {expected} bytes)")
        self.tokens = np.memmap(tokens, dtype=TOKEN_DTYPE, mode="r", shape=(n, self.seq_len))
        self._documents: np.ndarray | None = None
        # Packed by document or group: every sequence holds one unit, its last one padded.
        self.unit: str = self.manifest.get("unit", "sequence")
        self._sequences: np.ndarray | None = None
        if self.unit != "sequence":
            table = self.path / self.info["sequences_file"]
            if not table.is_file() or table.stat().st_size != n * 2 * np.dtype(DOCUMENT_DTYPE).itemsize:
                raise UserError(f"{table} is missing or truncated")
            self._sequences = np.memmap(table, dtype=DOCUMENT_DTYPE, mode="r", shape=(n, 2)) if n else \
                np.empty((0, 2), DOCUMENT_DTYPE)

    @cached_property
    def fingerprint(self) -> str:
        """SHA-256 of the folder's data files as they are now (computed from their content, not
        read from the manifest, so a file changed in place since prepare shows)."""
        return content_fingerprint(self.path)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self)
        i = int(i)
        if not -n <= i < n:
            raise IndexError(f"sequence {i} out of range for {n} sequences")
        return np.asarray(self.tokens[i])

    def batch(self, indices) -> torch.Tensor:
        """Sequences at `indices` as a LongTensor[B, seq_len] (sorted indices read fastest)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"batch index out of range for {len(self)} sequences")
        return torch.from_numpy(self.tokens[idx].astype(np.int64))

    def real_tokens(self, indices) -> np.ndarray:
        """How many leading tokens of each sequence at `indices` are data (the rest is padding)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if self._sequences is None:
            return np.full(len(idx), self.seq_len, dtype=np.int64)
        return np.asarray(self._sequences[idx, 1])

    @property
    def sequence_units(self) -> np.ndarray:
        """The unit (document id or group code) of every sequence; UserError when packed by sequence."""
        if self._sequences is None:
            raise UserError(f"{self.path} was packed by sequence; prepare it with --unit document or group")
        return np.asarray(self._sequences[:, 0])

    def unit_ranges(self) -> tuple[np.ndarray, np.ndarray]:
        """(first sequence, number of sequences) of every unit: a unit's sequences are contiguous."""
        units = self.sequence_units
        starts = np.flatnonzero(np.concatenate(([True], units[1:] != units[:-1]))) if len(units) else \
            np.empty(0, np.int64)
        return starts.astype(np.int64), np.diff(np.append(starts, len(units))).astype(np.int64)

    # Which documents (and groups) each sequence holds, for document- or user-level accounting.
    @property
    def document_table(self) -> np.ndarray:
        """int64 rows (document_id, start_token[, group]) in packing order, memory-mapped."""
        if self._documents is None:
            shape = (int(self.info["num_documents"]), len(self.info["documents_columns"]))
            if shape[0] == 0:
                self._documents = np.empty(shape, dtype=DOCUMENT_DTYPE)
            else:
                self._documents = np.memmap(self.path / self.info["documents_file"], dtype=DOCUMENT_DTYPE,
                                            mode="r", shape=shape)
        return self._documents

    def _rows(self, i: int) -> np.ndarray:
        starts = self.document_table[:, 1]
        lo = max(int(np.searchsorted(starts, i * self.seq_len, side="right")) - 1, 0)
        hi = int(np.searchsorted(starts, (i + 1) * self.seq_len, side="left"))
        return self.document_table[lo:hi]

    def documents(self, i: int) -> np.ndarray:
        """Ids (row numbers in the concatenated inputs) of the documents sequence `i` contains."""
        return np.asarray(self._rows(int(i))[:, 0])

    def groups(self, i: int) -> np.ndarray:
        """Group codes present in sequence `i` (index into `group_names`)."""
        if self.manifest.get("group_column") is None:
            raise UserError(f"{self.path} was prepared without --group-column")
        return np.unique(self._rows(int(i))[:, 2])

    @property
    def group_names(self) -> list[str]:
        return json.loads((self.path / GROUPS_FILE).read_text())

    # Pickle by path (e.g. for DataLoader workers): the memory maps are reopened, never copied.
    def __getstate__(self) -> dict:
        return {"path": self.path, "split": self.split}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["split"])

    def __repr__(self) -> str:
        return (f"PackedDataset({str(self.path)!r}, split={self.split!r}: {len(self)} x {self.seq_len} "
                f"tokens, vocab {self.vocab_size})")
