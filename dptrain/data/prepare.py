"""`prepare`: documents -> SentencePiece ids -> BOS doc EOS stream -> fixed-length sequences on disk.

`unit="sequence"` (default): each sequence of exactly `seq_len` tokens is one privacy unit (as in
VaultGemma): documents are wrapped in BOS ... EOS, concatenated in input order and cut every
`seq_len` tokens, so long documents span several sequences and short ones share one. The final
partial sequence of each split is dropped (no padding, so every token of every sequence is real data).

`unit="document"` or `"group"`: no sequence mixes two units. A unit's documents (a group's in input
order) are concatenated and cut every `seq_len` tokens, and the unit's last sequence is padded; a
per-sequence table records each sequence's unit and its number of real tokens, and the trainer
ignores the positions past them. Groups are laid out one after another (first appearance order).

The evaluation split is chosen at document level (or group level with a group column) before
packing, so no document or group straddles train and eval.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from dptrain.checkpoint import atomic_dir
from dptrain.data.sources import expand_inputs, load_documents
from dptrain.data.tokenizer import (MAX_SHARED_DOCUMENTS, load_tokenizer, sha256_file, tokenizer_document_sketch,
                                    tokenizer_provenance)
from dptrain.export import check_tokenizer_exports
from dptrain.errors import UserError
from dptrain.progress import progress_bar

FORMAT = "dptrain-packed"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.model"
GROUPS_FILE = "groups.json"
TOKEN_DTYPE = "<u4"
DOCUMENT_DTYPE = "<i8"
SPLITS = ("train", "eval")
UNITS = ("sequence", "document", "group")
SEQUENCE_COLUMNS = ["unit", "real_tokens"]


def tokens_file(split: str) -> str:
    return f"{split}.tokens.bin"


def documents_file(split: str) -> str:
    return f"{split}.documents.bin"


def sequences_file(split: str) -> str:
    return f"{split}.sequences.bin"


class _SplitWriter:
    """Appends BOS+doc+EOS token runs and writes every complete `seq_len` sequence to disk.

    The document table (int64 rows: document id, start token[, group]) streams to its own file,
    so neither tokens nor table are ever held whole in memory. With `pad_id` set (packing by unit),
    `append` takes each document's unit, a change of unit pads the stream to the next sequence
    boundary, and a sequence table (int64 rows: unit, real tokens) streams to a third file.
    """

    def __init__(self, folder: Path, split: str, seq_len: int, with_groups: bool, pad_id: int | None = None):
        self.pad_id = pad_id
        self.sequences = open(folder / sequences_file(split), "wb") if pad_id is not None else None
        self.unit = None  # the unit being written (packing by unit)
        self.padding = 0
        self.tokens = open(folder / tokens_file(split), "wb")
        self.table_path = folder / documents_file(split)
        self.table = open(self.table_path, "wb")
        self.seq_len = seq_len
        self.columns = 3 if with_groups else 2
        self.pending = np.empty(0, dtype=np.uint32)
        self.offset = 0  # tokens appended so far, i.e. stream position of `pending`'s end
        self.rows = 0
        self.first_dropped_row = None  # first document starting inside the dropped tail

    def append(self, tokens: np.ndarray, doc_ids: np.ndarray, doc_lengths: np.ndarray,
               groups: np.ndarray | None, units: np.ndarray | None = None) -> None:
        if self.pad_id is None:
            return self._append(tokens, doc_ids, doc_lengths, groups)
        # Runs of consecutive documents of one unit: each is appended whole after closing the last unit.
        runs = np.flatnonzero(np.diff(units)) + 1
        ends = np.concatenate(([0], np.cumsum(doc_lengths)))
        for a, b in zip(np.concatenate(([0], runs)), np.concatenate((runs, [len(units)]))):
            if self.unit is not None and units[a] != self.unit:
                self._close_unit()
            self.unit = int(units[a])
            self._append(tokens[ends[a]:ends[b]], doc_ids[a:b], doc_lengths[a:b],
                         None if groups is None else groups[a:b])

    def _close_unit(self) -> None:
        """Pad the current unit's last sequence to `seq_len` and record it."""
        real = len(self.pending)
        if real:
            pad = self.seq_len - real
            np.concatenate((self.pending, np.full(pad, self.pad_id, np.uint32))).astype(
                TOKEN_DTYPE, copy=False).tofile(self.tokens)
            np.array([[self.unit, real]], dtype=DOCUMENT_DTYPE).tofile(self.sequences)
            self.pending = self.pending[:0]
            self.offset += pad
            self.padding += pad

    def _append(self, tokens: np.ndarray, doc_ids: np.ndarray, doc_lengths: np.ndarray,
                groups: np.ndarray | None) -> None:
        starts = self.offset + np.concatenate(([0], np.cumsum(doc_lengths)[:-1]))
        cols = [doc_ids, starts] + ([groups] if groups is not None else [])
        np.stack(cols, axis=1).astype(DOCUMENT_DTYPE).tofile(self.table)
        self.rows += len(doc_ids)
        self.offset += len(tokens)
        self.pending = np.concatenate((self.pending, tokens)) if len(self.pending) else tokens
        full = len(self.pending) // self.seq_len * self.seq_len
        if full:
            self.pending[:full].astype(TOKEN_DTYPE, copy=False).tofile(self.tokens)
            self.pending = self.pending[full:]
            if self.sequences is not None:  # full sequences all belong to the current unit
                rows = np.empty((full // self.seq_len, 2), dtype=DOCUMENT_DTYPE)
                rows[:, 0], rows[:, 1] = self.unit, self.seq_len
                rows.tofile(self.sequences)

    def finish(self) -> dict:
        if self.sequences is not None:
            self._close_unit()
            self.sequences.close()
        self.tokens.close()
        self.table.close()
        dropped = len(self.pending)
        kept_tokens = self.offset - dropped
        # Starts increase, so documents wholly inside the dropped tail are the table's last rows.
        table = np.memmap(self.table_path, dtype=DOCUMENT_DTYPE, mode="r", shape=(self.rows, self.columns)) \
            if self.rows else np.empty((0, self.columns), DOCUMENT_DTYPE)
        kept_rows = int(np.searchsorted(table[:, 1], kept_tokens, side="left"))
        del table
        os.truncate(self.table_path, kept_rows * self.columns * np.dtype(DOCUMENT_DTYPE).itemsize)
        stats = {"num_sequences": kept_tokens // self.seq_len, "num_tokens": kept_tokens - self.padding,
                 "num_documents": kept_rows, "dropped_tail_tokens": dropped}
        if self.sequences is not None:
            units = np.fromfile(self.sequences.name, dtype=DOCUMENT_DTYPE).reshape(-1, 2)[:, 0]
            stats.update(padding_tokens=self.padding, num_units=int(len(np.unique(units))),
                         max_unit_sequences=int(np.unique(units, return_counts=True)[1].max(initial=0)))
        return stats


def _eval_mask(num_docs: int, fraction: float, seed: int, group_codes: np.ndarray | None,
               keep_in_train=()) -> np.ndarray:
    """Which documents are held out: a seeded random `fraction` of documents, or of groups.

    Documents in `keep_in_train` (and, with groups, their whole groups) are never held out.
    """
    rng = np.random.default_rng(seed)
    units = np.arange(num_docs) if group_codes is None else group_codes
    num_units = int(units.max()) + 1 if len(units) else 0
    eligible = np.ones(num_units, dtype=bool)
    eligible[units[np.asarray(keep_in_train, dtype=np.int64)]] = False
    candidates = np.flatnonzero(eligible)
    held = np.zeros(num_units, dtype=bool)
    held[rng.choice(candidates, size=min(round(fraction * num_units), len(candidates)), replace=False)] = True
    return held[units]


def _flatten(ids: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """One flat uint32 array of a batch's (already BOS/EOS-wrapped) id arrays, and their lengths."""
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.concatenate(ids).view(np.uint32) if ids else np.empty(0, np.uint32)  # ids are >= 0
    return flat, lengths


def prepare(
    inputs: list[str | Path],
    tokenizer: str | Path,
    seq_len: int,
    out: str | Path,
    *,
    text_column: str = "text",
    group_column: str | None = None,
    eval_fraction: float = 0.0,
    num_proc: int | None = None,
    seed: int = 0,
    batch_docs: int = 2048,
    progress: bool = True,
    keep_in_train=(),
    unit: str = "sequence",
) -> Path:
    """Tokenize and pack `inputs` into a self-contained prepared folder `out`; returns `out`.

    `keep_in_train`: document ids (row numbers) never drawn for eval, nor their groups.
    `unit`: "sequence" (cut the stream anywhere), "document" or "group" (no sequence mixes two).
    """
    if unit not in UNITS:
        raise UserError(f"unit must be one of {', '.join(UNITS)} (got {unit!r})")
    if unit == "group" and not group_column:
        raise UserError("packing by group needs --group-column")
    if seq_len < 2:
        raise UserError(f"seq-len must be at least 2 (got {seq_len})")
    if not 0.0 <= eval_fraction < 1.0:
        raise UserError(f"eval fraction must be in [0, 1) (got {eval_fraction})")
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).exists())):
        raise UserError(f"{out} exists and is not a prepared data folder; refusing to overwrite it")
    tokenizer = Path(tokenizer)
    sp = load_tokenizer(tokenizer)
    check_tokenizer_exports(tokenizer)  # refused now, not after a training run
    bos, eos = sp.bos_id(), sp.eos_id()
    # Padding only fills ignored positions after a unit's last real token; any valid id would do.
    pad = None if unit == "sequence" else (sp.pad_id() if sp.pad_id() >= 0 else eos)
    sources = expand_inputs(inputs)
    described = [_describe(s) for s in sources]
    provenance = _check_tokenizer_is_not_trained_on(tokenizer, described)
    num_threads = num_proc or os.cpu_count() or 1

    with atomic_dir(out) as tmp:
        cache = tmp / ".cache"
        columns = [text_column] + ([group_column] if group_column else [])
        ds = load_documents(sources, columns, cache)
        _check_tokenizer_content(tokenizer, ds, text_column, sources, progress)
        num_docs = len(ds)
        group_codes, group_values = None, None
        if group_column:
            values = ds[group_column]
            if any(v is None for v in values):
                raise UserError(f"group column {group_column!r} has empty values")
            index: dict = {}
            group_codes = np.fromiter((index.setdefault(v, len(index)) for v in values),
                                      dtype=np.int64, count=num_docs)
            group_values = list(index)
        is_eval = _eval_mask(num_docs, eval_fraction, seed, group_codes, keep_in_train)
        split_names = SPLITS if eval_fraction > 0 else SPLITS[:1]
        writers = {s: _SplitWriter(tmp, s, seq_len, group_column is not None, pad) for s in split_names}
        skipped = 0
        # Packing order: input order, or (by group) each group's documents together, in input order.
        order = np.argsort(group_codes, kind="stable") if unit == "group" else None

        def encode(start: int):
            rows = order[start:start + batch_docs] if order is not None else None
            texts = (ds[start:start + batch_docs] if rows is None else ds[rows.tolist()])[text_column]
            if any(t is None for t in texts):  # null text: an empty document, skipped below
                texts = [t or "" for t in texts]
            ids = sp.encode(texts, return_type="numpy", add_bos=True, add_eos=True,
                            num_threads=num_threads)
            return start, texts, ids

        starts = range(0, num_docs, batch_docs)
        with ThreadPoolExecutor(max_workers=1) as pool, \
                progress_bar(total=num_docs, unit="doc", desc="tokenize+pack", disable=not progress) as bar:
            # Encode the next batch (SentencePiece threads, GIL released) while packing this one.
            futures = [pool.submit(encode, s) for s in starts[:2]]
            for k in range(len(starts)):
                start, texts, ids = futures[k].result()
                futures[k] = None
                if k + 2 < len(starts):
                    futures.append(pool.submit(encode, starts[k + 2]))
                doc_ids = (np.arange(start, start + len(texts), dtype=np.int64) if order is None
                           else order[start:start + len(texts)])
                keep = np.fromiter((bool(t) for t in texts), dtype=bool, count=len(texts))
                skipped += int((~keep).sum())
                for split in split_names:
                    select = keep & (is_eval[doc_ids] == (split == "eval"))
                    if not select.any():
                        continue
                    chosen = np.flatnonzero(select)
                    tokens, lengths = _flatten([ids[i] for i in chosen])
                    groups = group_codes[doc_ids[chosen]] if group_codes is not None else None
                    units = {"sequence": None, "document": doc_ids[chosen], "group": groups}[unit]
                    writers[split].append(tokens, doc_ids[chosen], lengths, groups, units)
                bar.update(len(texts))

        stats = {s: writers[s].finish() for s in split_names}
        del ds
        shutil.rmtree(cache, ignore_errors=True)
        for split, st in stats.items():
            if st["num_sequences"] == 0:
                hint = "raise --eval-fraction or lower --seq-len" if split == "eval" else "lower --seq-len"
                raise UserError(f"the {split} split has fewer than {seq_len} tokens, so no complete "
                                f"sequence ({hint})")

        shutil.copyfile(tokenizer, tmp / TOKENIZER_FILE)
        if group_values is not None:
            (tmp / GROUPS_FILE).write_text(json.dumps([str(v) for v in group_values]) + "\n")
        from dptrain.data.fingerprint import content_fingerprint  # here: it imports this module
        from dptrain.data.vocab import MAX_TOKEN_ID, largest_token_id

        manifest = {
            "format": FORMAT,
            "fingerprint": content_fingerprint(tmp),  # of the data files written above
            "version": FORMAT_VERSION,
            "seq_len": seq_len,
            "vocab_size": sp.vocab_size(),
            "token_dtype": "uint32",
            "tokenizer": {"file": TOKENIZER_FILE, "source_path": str(tokenizer.resolve()),
                          "sha256": sha256_file(tokenizer), "bos_id": bos, "eos_id": eos,
                          "pad_id": sp.pad_id(), "padding_id": pad,
                          "provenance": provenance or "unknown: the model records no training inputs"},
            "sources": described,
            "text_column": text_column,
            "group_column": group_column,
            "groups_file": GROUPS_FILE if group_values is not None else None,
            "num_groups": len(group_values) if group_values is not None else None,
            "num_documents": num_docs,
            "skipped_empty_documents": skipped,
            "unit": unit,
            "packing": ("BOS doc EOS, concatenated in input order, cut every seq_len tokens" if unit == "sequence"
                        else f"BOS doc EOS, each {unit}'s documents concatenated and cut every seq_len "
                             "tokens, its last sequence padded"),
            "tail": "dropped" if unit == "sequence" else "padded",
            "eval_fraction": eval_fraction,
            "eval_unit": "group" if group_column else "document",
            "kept_in_train_documents": len(set(keep_in_train)),
            "seed": seed,
            "splits": {
                split: {**st, "tokens_file": tokens_file(split), "documents_file": documents_file(split),
                        "documents_columns": ["document_id", "start_token"] + (["group"] if group_column else []),
                        **({} if unit == "sequence" else
                           {"sequences_file": sequences_file(split), "sequences_columns": SEQUENCE_COLUMNS}),
                        "held_out": split == "eval",
                        MAX_TOKEN_ID: largest_token_id(np.memmap(tmp / tokens_file(split), dtype=TOKEN_DTYPE,
                                                                 mode="r"))}
                for split, st in stats.items()
            },
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return out


def _check_tokenizer_is_not_trained_on(tokenizer: Path, sources: list[dict]) -> dict | None:
    """The tokenizer's recorded training inputs; UserError when one of them is being prepared here
    (same content), since its vocabulary would leak that private data outside the guarantee."""
    provenance = tokenizer_provenance(tokenizer)
    if provenance is not None:
        private = {s["sha256"]: s["path"] for s in sources if "sha256" in s}
        for entry in provenance["trained_on"]:
            if entry["sha256"] in private:
                raise UserError(f"tokenizer {tokenizer} was trained on {private[entry['sha256']]}, which is being "
                                "prepared as private data: its vocabulary is outside the DP guarantee; train "
                                "the tokenizer on public text")
    return provenance


def _check_tokenizer_content(tokenizer: Path, ds, text_column: str, sources: list, progress: bool) -> None:
    """UserError when more than MAX_SHARED_DOCUMENTS of the documents sampled from the tokenizer's
    training text are among the documents being prepared, however their files were edited (a
    blank line, reordered lines, changed whitespace or case, more lines added)."""
    sketch = tokenizer_document_sketch(tokenizer)
    if sketch is None or not sketch.hashes:  # trained elsewhere or before sketches: file hashes only
        return
    limit = math.floor(MAX_SHARED_DOCUMENTS * len(sketch.hashes))  # refused above this many
    found: set[int] = set()
    with progress_bar(total=len(ds), unit="doc", desc="check tokenizer", disable=not progress) as bar:
        for batch in ds.select_columns([text_column]).iter(batch_size=4096):
            found |= sketch.found_in(batch[text_column])
            bar.update(len(batch[text_column]))
            if len(found) == len(sketch.hashes):  # nothing left to find
                break
    if len(found) > limit:
        names = ", ".join(Path(s).name if isinstance(s, Path) else s for s in sources[:3])
        more = f" and {len(sources) - 3} more" if len(sources) > 3 else ""
        raise UserError(f"tokenizer {tokenizer} was trained on the data being prepared ({names}{more}): "
                        f"{len(found) / len(sketch.hashes):.1%} of the documents sampled from its training text "
                        f"({len(found)} of {len(sketch.hashes)}) are in it (limit {MAX_SHARED_DOCUMENTS:.0%}); "
                        "its vocabulary is outside the DP guarantee; train the tokenizer on public text")


def _describe(source: Path | str) -> dict:
    if isinstance(source, Path):
        return {"path": str(source.resolve()), "bytes": source.stat().st_size, "sha256": sha256_file(source)}
    return {"hub": source}
