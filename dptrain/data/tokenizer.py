"""SentencePiece tokenizers with Gemma's special ids: pad 0, eos 1, bos 2, unk 3.

A tokenizer is part of what a model reveals: one trained on the private corpus can leak rare
strings through its vocabulary, outside any DP guarantee. Train it on public text; `train_tokenizer`
warns when its input looks private (see `looks_private`), and records the content hash of every
input in the model itself (`tokenizer_provenance`), so `prepare` can refuse a tokenizer trained on
the very files it is asked to prepare as private data, whatever their names.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Iterable

import sentencepiece as spm

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
    sha256:HEX" per input): no temporary or local paths, so the same training gives the same bytes
    wherever it runs, and the hashes travel with the model."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.read_bytes())
    proto.trainer_spec.model_prefix = name
    del proto.trainer_spec.input[:]
    proto.trainer_spec.input.extend(f"{p.name}{PROVENANCE_TAG}{sha256_file(p)}" for p in inputs)
    model.write_bytes(proto.SerializeToString())


def tokenizer_provenance(path: str | Path) -> dict | None:
    """{"trained_on": [{"name", "sha256"}, ...]} as recorded by `train_tokenizer`; None when the
    model holds no such record (trained elsewhere)."""
    from google.protobuf.message import DecodeError
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(Path(path).read_bytes())
    except (OSError, DecodeError):
        return None
    recorded = [entry.rpartition(PROVENANCE_TAG) for entry in proto.trainer_spec.input]
    if not recorded or not all(tag for _, tag, _ in recorded):
        return None
    return {"trained_on": [{"name": name, "sha256": digest} for name, _, digest in recorded]}
