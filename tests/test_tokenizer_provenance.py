"""A tokenizer trained on the private corpus is refused by `prepare` by content: the documents it was
trained on are recognised after a blank line is added, lines are reordered or re-spaced, or more lines
are appended; a tokenizer trained on other text is accepted."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from dptrain.data import PackedDataset, prepare, train_tokenizer
from dptrain.data.demo import write_demo_corpus
from dptrain.data.tokenizer import (MIN_DOCUMENT_CHARS, SKETCH_SIZE, SKETCH_TAG, DocumentSketch,
                                    PrivateTokenizerWarning, document_hash, normalize_document, sketch_documents,
                                    tokenizer_document_sketch, tokenizer_provenance)
from dptrain.errors import UserError

VOCAB = 400


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("provenance")
    files = write_demo_corpus(root / "corpus", seed=3, num_records=200, num_public_paragraphs=300)
    records = [json.loads(line)["text"] for line in files["private"].read_text().splitlines()]
    private = root / "records.txt"  # a neutral name: no privacy warning, the content must tell
    private.write_text("\n".join(records) + "\n")
    return {**files, "root": root, "records": private, "lines": private.read_text().splitlines()}


@pytest.fixture(scope="module")
def leaky(corpus) -> Path:
    return train_tokenizer([corpus["records"]], VOCAB, corpus["root"] / "leaky.model", num_threads=1)


@pytest.fixture(scope="module")
def public(corpus) -> Path:
    return train_tokenizer([corpus["public"]], VOCAB, corpus["root"] / "public.model", num_threads=1)


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def respaced(line: str, rng: random.Random) -> str:
    words = line.split(" ")
    return "\t" + "".join(w + rng.choice([" ", "  ", " \t "]) for w in words) + "   "


def edited_copies(corpus: dict, folder: Path) -> dict[str, Path]:
    """The private file as someone might pass it to prepare, each edit defeating a whole-file hash."""
    rng = random.Random(0)
    lines = corpus["lines"]
    shuffled = rng.sample(lines, len(lines))
    extra = corpus["public"].read_text().splitlines()
    return {
        "the file itself": corpus["records"],
        "a blank line added": write_lines(folder / "blank.txt", lines[:10] + [""] + lines[10:]),
        "reordered and re-spaced": write_lines(folder / "reordered.txt",
                                               [respaced(line, rng) for line in shuffled]),
        "lines appended": write_lines(folder / "appended.txt", lines + extra + extra[::-1]),
        "as jsonl records": corpus["private"],
    }


def test_a_tokenizer_trained_on_the_private_text_is_refused_however_the_file_is_edited(tmp_path, corpus, leaky):
    for case, private in edited_copies(corpus, tmp_path).items():
        with pytest.raises(UserError) as refusal:
            prepare([private], leaky, 32, tmp_path / "out", progress=False)
        message = str(refusal.value)
        assert "\n" not in message and "public text" in message, case
        if case != "the file itself":  # caught by content, not by the file's hash
            assert "of the documents sampled from its training text" in message, case
        assert not (tmp_path / "out").exists(), case


def test_a_tokenizer_trained_on_jsonl_records_is_refused(tmp_path, corpus):
    # SentencePiece reads the raw lines; the sketch takes each record's strings as its documents.
    with pytest.warns(PrivateTokenizerWarning):  # named private.jsonl
        tokenizer = train_tokenizer([corpus["private"]], VOCAB, tmp_path / "jsonl.model", num_threads=1)
    lines = corpus["lines"]
    with pytest.raises(UserError, match="documents sampled"):
        prepare([write_lines(tmp_path / "copy.txt", [""] + lines)], tokenizer, 32, tmp_path / "out",
                progress=False)


def test_a_tokenizer_trained_on_other_text_is_accepted(tmp_path, corpus, public):
    out = prepare([corpus["records"]], public, 32, tmp_path / "out", progress=False)
    provenance = PackedDataset(out).manifest["tokenizer"]["provenance"]
    assert [t["name"] for t in provenance["trained_on"]] == ["public.txt"]
    assert provenance["document_sketch"] == {"documents": 300, "sampled": 300}


def test_a_small_share_of_shared_documents_is_tolerated(tmp_path, corpus):
    public_lines = corpus["public"].read_text().splitlines()
    private = [line for line in corpus["lines"] if document_hash(line) is not None]
    for count, refused in ((2, False), (12, True)):  # 2 of 302 sampled is 0.7%, 12 of 312 is 3.8%
        mixed = write_lines(tmp_path / f"mixed{count}.txt", public_lines + private[:count])
        tokenizer = train_tokenizer([mixed], VOCAB, tmp_path / f"mixed{count}.model", num_threads=1)
        if refused:
            with pytest.raises(UserError, match=r"3\.8% .*\(12 of 312\)"):
                prepare([corpus["records"]], tokenizer, 32, tmp_path / "out", progress=False)
        else:
            prepare([corpus["records"]], tokenizer, 32, tmp_path / "out", progress=False)


def without_sketch(model: Path, out: Path) -> Path:
    """The model as `train_tokenizer` wrote it before sketches: file names and hashes only."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.read_bytes())
    kept = [e for e in proto.trainer_spec.input if not e.startswith(SKETCH_TAG)]
    del proto.trainer_spec.input[:]
    proto.trainer_spec.input.extend(kept)
    out.write_bytes(proto.SerializeToString())
    return out


def test_a_tokenizer_without_a_sketch_keeps_the_whole_file_check(tmp_path, corpus, leaky):
    old = without_sketch(leaky, tmp_path / "old.model")
    assert tokenizer_document_sketch(old) is None
    assert tokenizer_provenance(old) == {"trained_on": tokenizer_provenance(leaky)["trained_on"]}
    with pytest.raises(UserError, match="was trained on .*records.txt"):
        prepare([corpus["records"]], old, 32, tmp_path / "out", progress=False)


def test_the_model_loads_in_plain_sentencepiece_and_holds_the_sketch(corpus, leaky):
    sp = spm.SentencePieceProcessor(model_file=str(leaky))
    assert sp.vocab_size() == VOCAB and sp.decode(sp.encode("Clinic note")) == "Clinic note"
    sketch = tokenizer_document_sketch(leaky)
    expected = {document_hash(line) for line in corpus["lines"]} - {None}
    assert sketch.hashes == expected and sketch.documents == len(corpus["lines"]) - (
        sum(document_hash(line) is None for line in corpus["lines"]))


def test_normalisation():
    assert normalize_document("  Caf\u0065\u0301\tAU  LAIT\n") == "caf\u00e9 au lait"
    assert document_hash("x" * (MIN_DOCUMENT_CHARS - 1)) is None
    assert document_hash("  " + "x" * (MIN_DOCUMENT_CHARS - 1) + "  ") is None
    assert document_hash("The Same   Sentence,\tTwice over.") == document_hash("the same sentence, twice over.")


def test_the_sketch_is_a_bounded_deterministic_sample():
    texts = [f"document number {i} of a large corpus" for i in range(3 * SKETCH_SIZE)]
    sketch = sketch_documents(texts + texts[:100])  # duplicates counted, sampled once
    assert sketch.documents == len(texts) + 100 and len(sketch.hashes) == SKETCH_SIZE
    assert sketch.hashes == set(sorted(map(document_hash, texts))[:SKETCH_SIZE])  # the smallest
    assert sketch_documents(reversed(texts)) == DocumentSketch(len(texts), sketch.hashes)  # any order
    assert DocumentSketch.decode(sketch.encode()) == sketch
    assert len(sketch.encode()) < 45_000
    empty = sketch_documents(["short"])
    assert DocumentSketch.decode(empty.encode()) == DocumentSketch(0, frozenset())
    # a sample: about a third of any half of the documents is in it
    assert 0.25 < len(sketch.found_in(texts[::2])) / SKETCH_SIZE < 0.75
