"""SentencePiece tokenizers with Gemma's special ids: pad 0, eos 1, bos 2, unk 3.

A tokenizer is part of what a model reveals: one trained on the private corpus can leak rare
strings through its vocabulary, outside any DP guarantee. Train it on public text; `train_tokenizer`
warns when its input looks private (see `looks_private`), and records in the model itself the
content hash of every input and a sample of its documents' normalised hashes
(`tokenizer_provenance`, `tokenizer_document_sketch`), so `prepare` can refuse a tokenizer trained
on the documents it is asked to prepare as private data, whatever the files are called and however
their lines are edited, reordered or added to.
"""
from __future__ import annotations

import base64
import hashlib
import heapq
import json
import os
import re
import shutil
import tempfile
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import sentencepiece as spm

from dptrain.data.sources import check_utf8
from dptrain.errors import UserError

PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
# A file named like this in an input's folder (or any parent) marks the data as private.
PRIVATE_MARKER = ".dptrain-private"
PRIVATE_WORDS = ("private", "sensitive", "confidential", "secret", "secrets", "pii", "phi")


class PrivateTokenizerWarning(UserWarning):
    """The tokenizer is being trained on data that looks private: it is outside the DP guarantee."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def looks_private(path: str | Path) -> bool:
    """True when a word of the path's last three parts is a privacy word (`private`, `pii`, ...;
    whole words, so `philosophy.txt` is not flagged) or a `.dptrain-private` marker sits above it."""
    path = Path(path).resolve()
    words = {w for part in path.parts[-3:] for w in re.split(r"[^a-z0-9]+", part.lower())}
    if words & set(PRIVATE_WORDS):
        return True
    return any((folder / PRIVATE_MARKER).exists() for folder in [path, *path.parents] if folder.is_dir())


def load_tokenizer(path: str | Path) -> spm.SentencePieceProcessor:
    """Load a SentencePiece `.model`; an unreadable file or one without BOS/EOS is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"tokenizer {path} does not exist")
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except (OSError, RuntimeError) as err:
        raise UserError(f"tokenizer {path} is not a SentencePiece model ({err})") from None
    if sp.bos_id() < 0 or sp.eos_id() < 0:
        raise UserError(f"tokenizer {path} has no BOS or EOS piece; documents cannot be delimited")
    return sp


def train_tokenizer(
    inputs: Iterable[str | Path],
    vocab_size: int,
    out: str | Path,
    *,
    private: bool = False,
    num_threads: int | None = None,
    max_sentences: int = 2_000_000,
    seed: int = 0,
) -> Path:
    """Train a byte-fallback BPE SentencePiece model on text files (one sentence per line).

    `out` is the `.model` path (a `.vocab` is written beside it). Warns with
    `PrivateTokenizerWarning` when `private` is set or an input looks private. With
    `num_threads=1` the result is bit-reproducible for a given `seed`; with more threads the
    floating-point sums of training vary slightly from run to run.
    """
    inputs = [Path(p) for p in inputs]
    if not inputs:
        raise UserError("no tokenizer training input given")
    for path in inputs:
        if not path.is_file():
            raise UserError(f"tokenizer input {path} does not exist or is not a file")
    if private or any(looks_private(p) for p in inputs):
        warnings.warn(
            "training the tokenizer on private data: its vocabulary is NOT covered by the DP "
            "guarantee and can reveal rare strings; train it on public text instead",
            PrivateTokenizerWarning,
            stacklevel=2,
        )
    if vocab_size < 300:
        raise UserError(f"vocab size {vocab_size} is too small: byte fallback alone needs 260 ids")
    if sum(p.stat().st_size for p in inputs) == 0:
        raise UserError("tokenizer training input is empty")
    for path in inputs:  # SentencePiece would quietly train on mangled text
        check_utf8(path, "tokenizer input")
    out = Path(out)
    if out.suffix != ".model":
        out = out.with_name(out.name + ".model")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tokenizer-", dir=out.parent) as tmp:
        prefix = Path(tmp) / "sp"
        spm.set_random_generator_seed(seed)
        try:
            spm.SentencePieceTrainer.Train(
                input=[str(p) for p in inputs],
                model_prefix=str(prefix),
                vocab_size=vocab_size,
                # Gemma's tokenizer is BPE: Hugging Face's GemmaTokenizer encodes a unigram
                # model differently, so a unigram model could never be exported.
                model_type="bpe",
                byte_fallback=True,
                # Gemma's conventions, so the exported Hugging Face tokenizer encodes identically.
                add_dummy_prefix=False,
                remove_extra_whitespaces=False,
                normalization_rule_name="identity",
                character_coverage=0.9995,
                split_digits=True,
                pad_id=PAD_ID, eos_id=EOS_ID, bos_id=BOS_ID, unk_id=UNK_ID,
                pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
                num_threads=num_threads or os.cpu_count() or 1,
                input_sentence_size=max_sentences,
                shuffle_input_sentence=True,
                minloglevel=2,
            )
        except RuntimeError as err:
            raise UserError(f"tokenizer training failed: {str(err).strip().splitlines()[-1]}") from None
        _scrub_paths(prefix.with_suffix(".model"), out.stem, inputs)
        # Replace in one rename each, so a reader never sees a half-written model.
        shutil.move(str(prefix.with_suffix(".vocab")), out.with_suffix(".vocab"))
        shutil.move(str(prefix.with_suffix(".model")), out)
    return out


PROVENANCE_TAG = " sha256:"


def _scrub_paths(model: Path, name: str, inputs: list[Path]) -> None:
    """Keep only file names and content hashes in the model's recorded training spec ("name
    sha256:HEX" per input), then the inputs' document sketch as one more entry: no temporary or
    local paths, so the same training gives the same bytes wherever it runs, and the record
    travels with the model (plain SentencePiece ignores these strings when it loads it)."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.read_bytes())
    proto.trainer_spec.model_prefix = name
    del proto.trainer_spec.input[:]
    proto.trainer_spec.input.extend(f"{p.name}{PROVENANCE_TAG}{sha256_file(p)}" for p in inputs)
    proto.trainer_spec.input.append(sketch_documents(tokenizer_training_documents(inputs)).encode())
    model.write_bytes(proto.SerializeToString())


def _recorded_inputs(path: str | Path) -> list[str]:
    """The model's recorded training inputs (`trainer_spec.input`); [] when it cannot be parsed."""
    from google.protobuf.message import DecodeError
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(Path(path).read_bytes())
    except (OSError, DecodeError):
        return []
    return list(proto.trainer_spec.input)


def tokenizer_provenance(path: str | Path) -> dict | None:
    """{"trained_on": [{"name", "sha256"}, ...]} as recorded by `train_tokenizer`, with
    "document_sketch": {"documents", "sampled"} when the model holds a sketch (models trained since
    sketches were recorded); None when the model holds no such record (trained elsewhere)."""
    entries = _recorded_inputs(path)
    sketches = [DocumentSketch.decode(e) for e in entries if e.startswith(SKETCH_TAG)]
    recorded = [e.rpartition(PROVENANCE_TAG) for e in entries if not e.startswith(SKETCH_TAG)]
    if not recorded or not all(tag for _, tag, _ in recorded):
        return None
    provenance: dict = {"trained_on": [{"name": name, "sha256": digest} for name, _, digest in recorded]}
    if sketches:
        provenance["document_sketch"] = {"documents": sketches[0].documents,
                                         "sampled": len(sketches[0].hashes)}
    return provenance


def tokenizer_document_sketch(path: str | Path) -> DocumentSketch | None:
    """The sketch of the tokenizer's training documents recorded by `train_tokenizer`; None for
    models without one (trained elsewhere, or before sketches were recorded)."""
    for entry in _recorded_inputs(path):
        if entry.startswith(SKETCH_TAG):
            return DocumentSketch.decode(entry)
    return None


# --- what the tokenizer was trained on, by content ----------------------------------------------
#
# A document is what SentencePiece reads as one sentence: a line of an input (a JSON object line,
# i.e. a jsonl record, counts as its string values). Each is normalised (NFC, lowercase, whitespace
# runs to one space, stripped) and hashed to 64 bits, so edits of whitespace or case, reordering
# and added lines leave the hashes of the other documents unchanged. The model keeps the
# SKETCH_SIZE smallest distinct hashes: a uniform sample of its documents, the same wherever and
# however often the same text is sketched (bottom-k MinHash), so the file stays small.
#
# The tokenizer is published, and so is this sample. It reveals little of the training text: a
# hash cannot be read back into text, documents under MIN_DOCUMENT_CHARS (too common to identify a
# corpus, and few enough to enumerate) are not hashed at all, and what a reader can do is test a
# document they already hold for membership in a sample of at most SKETCH_SIZE documents, of text
# that was meant to be public anyway; the vocabulary says more about the training text than that.

SKETCH_TAG = "document-sketch:"
SKETCH_VERSION = "v1"
SKETCH_SIZE = 4096
MIN_DOCUMENT_CHARS = 20
# `prepare` refuses a tokenizer when more than this share of its sampled documents are private ones.
MAX_SHARED_DOCUMENTS = 0.01
_HASH_PERSON = b"dptrain-doc-v1"  # domain separation: these hashes match no other system's


def normalize_document(text: str) -> str:
    return " ".join(unicodedata.normalize("NFC", text).lower().split())


def document_hash(text: str) -> int | None:
    """64-bit hash of the normalised document; None when it is shorter than MIN_DOCUMENT_CHARS."""
    normal = normalize_document(text)
    if len(normal) < MIN_DOCUMENT_CHARS:
        return None
    digest = hashlib.blake2b(normal.encode(), digest_size=8, person=_HASH_PERSON).digest()
    return int.from_bytes(digest, "big")


@dataclass(frozen=True)
class DocumentSketch:
    """`documents` hashed (those long enough, duplicates included); `hashes`: the smallest
    SKETCH_SIZE distinct ones."""

    documents: int
    hashes: frozenset[int]

    def encode(self) -> str:
        packed = b"".join(h.to_bytes(8, "big") for h in sorted(self.hashes))
        return f"{SKETCH_TAG}{SKETCH_VERSION} documents={self.documents} {base64.b64encode(packed).decode()}"

    @classmethod
    def decode(cls, entry: str) -> DocumentSketch:
        version, documents, packed = (entry[len(SKETCH_TAG):].split(" ") + [""])[:3]
        if version != SKETCH_VERSION or not documents.startswith("documents="):
            raise UserError(f"unknown tokenizer document sketch {entry[:40]!r}; update dptrain")
        try:
            raw = base64.b64decode(packed, validate=True)
        except ValueError:
            raise UserError("the tokenizer's document sketch is corrupt") from None
        hashes = frozenset(int.from_bytes(raw[i:i + 8], "big") for i in range(0, len(raw), 8))
        return cls(int(documents.removeprefix("documents=")), hashes)

    def found_in(self, texts: Iterable[str | None]) -> set[int]:
        """The sampled hashes that occur among `texts`, each text taken whole and line by line (a
        multi-line document may have been trained on as lines of a text file)."""
        found = set()
        for text in texts:
            if not text:
                continue
            parts = [text, *text.split("\n")] if "\n" in text else [text]
            found.update(h for h in map(document_hash, parts) if h in self.hashes)
        return found


def sketch_documents(texts: Iterable[str], size: int = SKETCH_SIZE) -> DocumentSketch:
    """Bottom-`size` sketch of the documents' hashes, in memory bounded by `size`."""
    heap: list[int] = []  # negated kept hashes: -heap[0] is the largest kept
    kept: set[int] = set()
    documents = 0
    for h in map(document_hash, texts):
        if h is None:
            continue
        documents += 1
        if h in kept:
            continue
        if len(heap) < size:
            heapq.heappush(heap, -h)
            kept.add(h)
        elif h < -heap[0]:
            kept.discard(-heapq.heappushpop(heap, -h))
            kept.add(h)
    return DocumentSketch(documents, frozenset(kept))


def tokenizer_training_documents(inputs: Iterable[str | Path]) -> Iterator[str]:
    """The documents of text files as SentencePiece reads them: each line split at "\\n" only."""
    for path in inputs:
        with open(path, "rb") as f:
            for line in f:
                yield from _line_documents(line.decode("utf-8", errors="replace"))


def _line_documents(line: str) -> Iterator[str]:
    """A line, or a jsonl record's string values (the private text inside a record's syntax)."""
    if line.lstrip().startswith("{"):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            yield from (value for value in record.values() if isinstance(value, str))
            return
    yield line
