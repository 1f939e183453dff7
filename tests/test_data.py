"""Tokenizer, packing, PackedDataset and prepare's error handling, each against a naive reference."""
from __future__ import annotations

import dataclasses
import importlib
import json
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

from dptrain.cli import main
from dptrain.data import PackedDataset, check_vocab, prepare, train_tokenizer
from dptrain.data.demo import write_demo_corpus
from dptrain.data.tokenizer import PrivateTokenizerWarning, looks_private, sha256_file
from dptrain.errors import UserError
from dptrain.model import DecoderConfig

VOCAB = 400
BOS, EOS = 2, 1
WORDS = "alpha beta gamma delta patient account river bank note 2024 Zoë naïve €5".split()


@pytest.fixture(scope="module")
def public_text(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    return write_demo_corpus(folder / "corpus", seed=1, num_records=64, num_public_paragraphs=400)["public"]


@pytest.fixture(scope="module")
def tokenizer(public_text) -> Path:
    return train_tokenizer([public_text], VOCAB, public_text.parent.parent / "public.model")


def make_docs(n: int, seed: int = 0) -> list[dict]:
    """Documents of very different lengths (empty, short, longer than a sequence), 5 users."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        length = int(rng.choice([0, 1, 3, 10, 60])) if i % 7 else 0
        text = " ".join(rng.choice(WORDS, size=length)) if i % 11 else None  # JSON null: skipped
        docs.append({"text": text, "user": f"u{i % 5}", "n": i})
    return docs


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def naive_pack(texts: list[str], sp: spm.SentencePieceProcessor, seq_len: int) -> np.ndarray:
    """Reference: BOS + ids + EOS per non-empty document, concatenated, cut, partial tail dropped."""
    stream: list[int] = []
    for text in texts:
        if text:
            stream += [BOS] + sp.encode(text) + [EOS]
    n = len(stream) // seq_len
    return np.array(stream[: n * seq_len], dtype=np.uint32).reshape(n, seq_len)


def naive_documents(texts: list[str], ids: list[int], sp, seq_len: int) -> list[list[int]]:
    """Reference: for each kept sequence, the ids of the documents with a token inside it."""
    owner: list[int] = []
    for text, doc_id in zip(texts, ids):
        if text:
            owner += [doc_id] * (len(sp.encode(text)) + 2)
    n = len(owner) // seq_len
    return [sorted(set(owner[i * seq_len:(i + 1) * seq_len])) for i in range(n)]


def split_docs(folder: Path, split: str) -> list[int]:
    return [int(d) for d in PackedDataset(folder, split).document_table[:, 0]]


# --- tokenizer --------------------------------------------------------------------------------

def test_tokenizer_special_ids_and_byte_fallback(tokenizer):
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    assert (sp.pad_id(), sp.eos_id(), sp.bos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert sp.vocab_size() == VOCAB
    text = "Zoë paid €5 — 日本 🙂"  # characters the public text never shows
    ids = sp.encode(text)
    assert sp.unk_id() not in ids
    assert sp.decode(ids) == text


def test_looks_private(tmp_path):
    for name in ("private.jsonl", "patients_private.txt", "pii-dump.parquet", "Confidential Notes.txt"):
        assert looks_private(tmp_path / name), name
    for name in ("philosophy.txt", "secretary_handbook.txt", "wiki.txt"):
        assert not looks_private(tmp_path / "public" / name), name
    (tmp_path / "vault" / "deep").mkdir(parents=True)
    (tmp_path / "vault" / ".dptrain-private").touch()
    assert looks_private(tmp_path / "vault" / "deep" / "notes.txt")


def test_tokenizer_warning_for_private_data(tmp_path, public_text):
    public = tmp_path / "corpus.txt"
    public.write_text(public_text.read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrivateTokenizerWarning)
        train_tokenizer([public], VOCAB, tmp_path / "a.model")  # no warning
    with pytest.warns(PrivateTokenizerWarning):
        train_tokenizer([public], VOCAB, tmp_path / "b.model", private=True)
    named = tmp_path / "patients_private.txt"
    named.write_text(public.read_text())
    with pytest.warns(PrivateTokenizerWarning):
        train_tokenizer([named], VOCAB, tmp_path / "c.model")
    marked = tmp_path / "vault"
    marked.mkdir()
    (marked / ".dptrain-private").touch()
    (marked / "notes.txt").write_text(public.read_text())
    with pytest.warns(PrivateTokenizerWarning):
        train_tokenizer([marked / "notes.txt"], VOCAB, tmp_path / "d.model")


def test_tokenizer_is_reproducible_with_one_thread(tmp_path, public_text, tokenizer):
    again = train_tokenizer([public_text], VOCAB, tmp_path / "elsewhere" / "tok.model", num_threads=1)
    first = train_tokenizer([public_text], VOCAB, tmp_path / "tok.model", num_threads=1)
    assert again.read_bytes() == first.read_bytes()
    assert str(tmp_path).encode() not in first.read_bytes()  # no local paths recorded


def test_tokenizer_bad_input(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        train_tokenizer([tmp_path / "missing.txt"], 300, tmp_path / "t.model")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UserError, match="empty"):
        train_tokenizer([tmp_path / "empty.txt"], 300, tmp_path / "t.model")
    (tmp_path / "tiny.txt").write_text("abc\n")
    with pytest.raises(UserError, match="tokenizer training failed"):
        train_tokenizer([tmp_path / "tiny.txt"], 5000, tmp_path / "t.model")
    assert not (tmp_path / "t.model").exists()


# --- packing ----------------------------------------------------------------------------------

@pytest.mark.parametrize("seq_len,batch_docs", [(16, 1), (37, 5), (128, 1024)])
def test_packing_matches_naive_reference(tmp_path, tokenizer, seq_len, batch_docs):
    docs = make_docs(120)
    src = write_jsonl(tmp_path / "docs.jsonl", docs)
    out = prepare([src], tokenizer, seq_len, tmp_path / "prep", batch_docs=batch_docs, progress=False)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    texts = [d["text"] for d in docs]
    expected = naive_pack(texts, sp, seq_len)
    ds = PackedDataset(out)
    assert len(ds) == len(expected) > 0
    assert np.array_equal(np.stack([ds[i] for i in range(len(ds))]), expected)
    assert torch.equal(ds.batch(np.arange(len(ds))), torch.from_numpy(expected.astype(np.int64)))
    reference = naive_documents(texts, list(range(len(docs))), sp, seq_len)
    assert [sorted(ds.documents(i).tolist()) for i in range(len(ds))] == reference
    m = ds.manifest
    stream = sum(len(sp.encode(t)) + 2 for t in texts if t)
    assert m["splits"]["train"]["dropped_tail_tokens"] == stream - expected.size
    assert m["skipped_empty_documents"] == sum(1 for t in texts if not t)


def test_eval_split_is_disjoint_document_level(tmp_path, tokenizer):
    docs = make_docs(200, seed=3)
    src = write_jsonl(tmp_path / "docs.jsonl", docs)
    out = prepare([src], tokenizer, 24, tmp_path / "prep", eval_fraction=0.25, seed=7, batch_docs=16,
                  progress=False)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    held = importlib.import_module("dptrain.data.prepare")._eval_mask(200, 0.25, 7, None)
    assert held.sum() == 50
    listed = {split: split_docs(out, split) for split in ("train", "eval")}
    assert not set(listed["train"]) & set(listed["eval"])
    for split, ids in (("train", np.flatnonzero(~held)), ("eval", np.flatnonzero(held))):
        ds = PackedDataset(out, split)
        texts = [docs[i]["text"] for i in ids]
        # each split is exactly the naive packing of its own documents: none straddles the two
        assert np.array_equal(ds.tokens, naive_pack(texts, sp, 24))
        assert set(listed[split]) <= set(ids.tolist())
        assert ds.held_out == (split == "eval") == ds.manifest["splits"][split]["held_out"]
    assert PackedDataset(out, "eval").manifest["eval_unit"] == "document"


def test_group_column_holds_out_whole_groups(tmp_path, tokenizer):
    docs = [dict(d, user=f"u{i % 20}") for i, d in enumerate(make_docs(200, seed=4))]
    src = write_jsonl(tmp_path / "docs.jsonl", docs)
    out = prepare([src], tokenizer, 24, tmp_path / "prep", group_column="user", eval_fraction=0.2,
                  progress=False)
    train, evals = PackedDataset(out, "train"), PackedDataset(out, "eval")
    names = train.group_names
    train_users = {docs[i]["user"] for i in split_docs(out, "train")}
    eval_users = {docs[i]["user"] for i in split_docs(out, "eval")}
    assert not train_users & eval_users
    assert len(eval_users) == 4  # 20% of 20 users
    for ds in (train, evals):
        for i in range(len(ds)):
            expected = {docs[d]["user"] for d in ds.documents(i)}
            assert {names[g] for g in ds.groups(i)} == expected
    assert train.manifest["num_groups"] == 20 and train.manifest["eval_unit"] == "group"


def test_manifest_and_self_contained_folder(tmp_path, tokenizer):
    src = write_jsonl(tmp_path / "docs.jsonl", make_docs(50))
    out = prepare([src], tokenizer, 32, tmp_path / "prep", eval_fraction=0.2, progress=False)
    m = json.loads((out / "manifest.json").read_text())
    assert m["seq_len"] == 32 and m["vocab_size"] == VOCAB and m["tail"] == "dropped"
    assert m["tokenizer"]["sha256"] == sha256_file(tokenizer) == sha256_file(out / "tokenizer.model")
    assert m["tokenizer"]["source_path"] == str(tokenizer.resolve())
    assert m["sources"] == [{"path": str(src.resolve()), "bytes": src.stat().st_size,
                             "sha256": sha256_file(src)}]
    assert m["num_documents"] == 50
    for split in ("train", "eval"):
        info = m["splits"][split]
        size = (out / info["tokens_file"]).stat().st_size
        assert size == info["num_sequences"] * 32 * 4 == info["num_tokens"] * 4
        table = (out / info["documents_file"]).stat().st_size
        assert table == info["num_documents"] * len(info["documents_columns"]) * 8
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json", "tokenizer.model", "train.tokens.bin", "train.documents.bin",
         "eval.tokens.bin", "eval.documents.bin"])
    ds = PackedDataset(out)
    assert ds.tokenizer_path == out / "tokenizer.model" and ds.seq_len == 32 and ds.vocab_size == VOCAB


def test_other_formats_give_the_same_tokens(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [d for d in make_docs(60) if d["text"]]
    ref = PackedDataset(prepare([write_jsonl(tmp_path / "d.jsonl", docs)], tokenizer, 16,
                                tmp_path / "ref", progress=False)).tokens
    pq.write_table(pa.table({"text": [d["text"] for d in docs]}), tmp_path / "d.parquet")
    (tmp_path / "d.txt").write_text("".join(d["text"] + "\n" for d in docs))
    for name in ("d.parquet", "d.txt"):
        got = PackedDataset(prepare([tmp_path / name], tokenizer, 16, tmp_path / f"out-{name}",
                                    progress=False)).tokens
        assert np.array_equal(got, ref), name
    # two inputs are concatenated in order
    half = len(docs) // 2
    parts = [write_jsonl(tmp_path / "a.jsonl", docs[:half]), write_jsonl(tmp_path / "b.jsonl", docs[half:])]
    got = PackedDataset(prepare(parts, tokenizer, 16, tmp_path / "two", progress=False)).tokens
    assert np.array_equal(got, ref)


# --- PackedDataset ----------------------------------------------------------------------------

def test_random_access_is_memory_mapped(tmp_path, tokenizer):
    src = write_jsonl(tmp_path / "docs.jsonl", make_docs(150))
    ds = PackedDataset(prepare([src], tokenizer, 16, tmp_path / "prep", progress=False))
    assert isinstance(ds.tokens, np.memmap)
    raw = np.fromfile(tmp_path / "prep" / "train.tokens.bin", dtype="<u4").reshape(-1, 16)
    rng = np.random.default_rng(0)
    for i in rng.integers(0, len(ds), size=20):
        row = ds[i]
        assert row.dtype == np.uint32 and row.shape == (16,)
        assert np.array_equal(row, raw[i])
    assert np.array_equal(ds[-1], raw[-1])
    idx = np.sort(rng.choice(len(ds), size=7, replace=False))
    batch = ds.batch(idx)
    assert batch.dtype == torch.int64 and batch.shape == (7, 16)
    assert np.array_equal(batch.numpy(), raw[idx])
    copy = pickle.loads(pickle.dumps(ds))
    assert len(pickle.dumps(ds)) < 1000 and isinstance(copy.tokens, np.memmap)
    assert np.array_equal(copy[3], raw[3]) and copy.split == "train"
    with pytest.raises(IndexError):
        ds[len(ds)]
    with pytest.raises(IndexError):
        ds.batch([0, len(ds)])


def test_indices_beyond_32_bits(tmp_path):
    """A sparse token file with more than 2**32 tokens: the last sequence is still addressable."""
    folder = tmp_path / "huge"
    folder.mkdir()
    n, seq_len = 2**31 + 3, 4  # 8.6e9 tokens, 34 GB sparse
    tokens = folder / "train.tokens.bin"
    try:
        with open(tokens, "wb") as f:
            f.seek((n - 1) * seq_len * 4)
            f.write(np.array([7, 8, 9, 10], dtype="<u4").tobytes())
    except OSError:
        pytest.skip("file system without sparse files")
    np.array([[0, 0]], dtype="<i8").tofile(folder / "train.documents.bin")
    (folder / "manifest.json").write_text(json.dumps({
        "format": "dptrain-packed", "seq_len": seq_len, "vocab_size": 16, "group_column": None,
        "tokenizer": {"file": "tokenizer.model"},
        "splits": {"train": {"num_sequences": n, "tokens_file": tokens.name, "held_out": False,
                             "documents_file": "train.documents.bin", "num_documents": 1,
                             "documents_columns": ["document_id", "start_token"]}}}))
    ds = PackedDataset(folder)
    assert len(ds) == n
    assert ds[n - 1].tolist() == [7, 8, 9, 10]
    assert ds.batch([0, n - 1]).tolist() == [[0, 0, 0, 0], [7, 8, 9, 10]]
    assert ds.documents(n - 1).tolist() == [0]


def test_check_vocab(tmp_path, tokenizer):
    src = write_jsonl(tmp_path / "docs.jsonl", make_docs(40))
    out = prepare([src], tokenizer, 16, tmp_path / "prep", progress=False)
    cfg = DecoderConfig.from_yaml("configs/model/tiny.yaml")
    with pytest.raises(UserError, match="vocabulary of 400 but the model has vocab_size 2048"):
        check_vocab(out, cfg)
    check_vocab(PackedDataset(out), dataclasses.replace(cfg, vocab_size=VOCAB))


# --- atomic writes and bad input --------------------------------------------------------------

def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_interrupted_prepare_leaves_nothing(tmp_path, tokenizer, monkeypatch):
    prepare_module = importlib.import_module("dptrain.data.prepare")  # the package re-exports a function of that name
    src = write_jsonl(tmp_path / "docs.jsonl", make_docs(100))
    calls = {"n": 0}
    real = prepare_module._flatten

    def failing(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(prepare_module, "_flatten", failing)
    out = tmp_path / "out" / "prep"
    with pytest.raises(KeyboardInterrupt):
        prepare([src], tokenizer, 16, out, batch_docs=10, progress=False)
    assert calls["n"] == 3
    assert not out.exists() and leftovers(out.parent) == []
    # an earlier complete folder survives a failed rewrite untouched
    monkeypatch.setattr(prepare_module, "_flatten", real)
    prepare([src], tokenizer, 16, out, progress=False)
    before = (out / "train.tokens.bin").read_bytes()
    calls["n"] = 0
    monkeypatch.setattr(prepare_module, "_flatten", failing)
    with pytest.raises(KeyboardInterrupt):
        prepare([src], tokenizer, 16, out, batch_docs=10, progress=False)
    assert (out / "train.tokens.bin").read_bytes() == before and leftovers(out.parent) == []


@pytest.mark.parametrize("case", ["empty", "no_column", "malformed", "missing", "not_text",
                                  "bad_tokenizer", "too_short", "bad_fraction", "bad_seq_len",
                                  "unknown_type", "no_eval_sequence"])
def test_bad_input_is_one_line_user_error(tmp_path, tokenizer, case):
    good = write_jsonl(tmp_path / "good.jsonl", make_docs(40))
    args = {"inputs": [good], "tokenizer": tokenizer, "seq_len": 16, "kw": {}}
    if case == "empty":
        (tmp_path / "e.jsonl").write_text("")
        args["inputs"] = [tmp_path / "e.jsonl"]
    elif case == "no_column":
        args["inputs"] = [write_jsonl(tmp_path / "c.jsonl", [{"body": "x"}])]
    elif case == "malformed":
        (tmp_path / "m.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
        args["inputs"] = [tmp_path / "m.jsonl"]
    elif case == "missing":
        args["inputs"] = [tmp_path / "nope.jsonl"]
    elif case == "not_text":
        args["inputs"] = [write_jsonl(tmp_path / "n.jsonl", [{"text": 5}, {"text": 6}])]
    elif case == "bad_tokenizer":
        (tmp_path / "bad.model").write_bytes(b"not a model")
        args["tokenizer"] = tmp_path / "bad.model"
    elif case == "too_short":
        args["inputs"] = [write_jsonl(tmp_path / "s.jsonl", [{"text": "hi"}])]
    elif case == "bad_fraction":
        args["kw"] = {"eval_fraction": 1.0}
    elif case == "bad_seq_len":
        args["seq_len"] = 1
    elif case == "unknown_type":
        (tmp_path / "d.docx").write_text("x")
        args["inputs"] = [tmp_path / "d.docx"]
    elif case == "no_eval_sequence":
        args["kw"] = {"eval_fraction": 0.01}
    out = tmp_path / "out" / "prep"
    with pytest.raises(UserError) as err:
        prepare(args["inputs"], args["tokenizer"], args["seq_len"], out, progress=False, **args["kw"])
    assert "\n" not in str(err.value) and str(err.value)
    assert not out.exists()
    assert not out.parent.exists() or leftovers(out.parent) == []


def test_refuses_to_overwrite_a_foreign_folder(tmp_path, tokenizer):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    src = write_jsonl(tmp_path / "docs.jsonl", make_docs(40))
    with pytest.raises(UserError, match="refusing"):
        prepare([src], tokenizer, 16, tmp_path / "mine", progress=False)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


def test_tokenizer_that_cannot_be_exported_is_refused_before_training(tmp_path, public_text):
    # A unigram model with a dummy prefix: Hugging Face's Gemma tokenizer encodes it differently.
    spm.SentencePieceTrainer.train(
        input=str(public_text), model_prefix=str(tmp_path / "uni"), vocab_size=VOCAB, model_type="unigram",
        byte_fallback=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3, minloglevel=2)
    src = write_jsonl(tmp_path / "docs.jsonl", make_docs(20))
    with pytest.raises(UserError, match="could not be exported"):
        prepare([src], tmp_path / "uni.model", 16, tmp_path / "prep", progress=False)
    assert not (tmp_path / "prep").exists()


def test_cli_tokenizer_offers_only_what_exports(tmp_path, public_text, capsys):
    out = tmp_path / "tok.model"
    assert main(["tokenizer", "train", "--input", str(public_text), "--vocab-size", str(VOCAB),
                 "--out", str(out), "--num-threads", "1"]) == 0
    src = write_jsonl(tmp_path / "docs.jsonl", make_docs(20))
    prepare([src], out, 16, tmp_path / "prep", progress=False)  # accepted: it exports
    with pytest.raises(SystemExit):
        main(["tokenizer", "train", "--input", str(public_text), "--vocab-size", str(VOCAB),
              "--out", str(out), "--model-type", "unigram"])
    assert "unrecognized arguments: --model-type" in capsys.readouterr().err


def test_open_errors(tmp_path):
    with pytest.raises(UserError, match="no manifest.json"):
        PackedDataset(tmp_path)


# --- CLI --------------------------------------------------------------------------------------

def test_cli_prepare_and_errors(tmp_path, tokenizer, capsys):
    src = write_jsonl(tmp_path / "docs.jsonl", make_docs(60))
    rc = main(["data", "prepare", "--input", str(src), "--tokenizer", str(tokenizer), "--seq-len", "16",
               "--out", str(tmp_path / "prep"), "--group-column", "user", "--eval-fraction", "0.2"])
    assert rc == 0
    assert "held out" in capsys.readouterr().out
    assert len(PackedDataset(tmp_path / "prep", "eval")) > 0
    rc = main(["data", "prepare", "--input", str(src), "--tokenizer", str(tokenizer),
               "--out", str(tmp_path / "x"), "--text-column", "body"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "no column 'body'" in err
    rc = main(["tokenizer", "info", str(tokenizer)])
    assert rc == 0 and "pad 0, eos 1, bos 2, unk 3" in capsys.readouterr().out


# --- packing by unit (document or group) ------------------------------------------------------

def naive_pack_by_unit(docs: list[dict], sp, seq_len: int, unit: str, pad: int):
    """Reference: each unit's (document's, or user's in input order) BOS+ids+EOS stream, cut every
    seq_len tokens, its last sequence padded; units in first-appearance order. Returns the token
    rows, each row's unit key (document id or user) and its number of real tokens."""
    keys = [i if unit == "document" else d["user"] for i, d in enumerate(docs)]
    rows, owners, reals = [], [], []
    for key in dict.fromkeys(keys):
        stream = [t for i, d in enumerate(docs) if keys[i] == key and d["text"]
                  for t in [BOS] + sp.encode(d["text"]) + [EOS]]
        for a in range(0, len(stream), seq_len):
            chunk = stream[a:a + seq_len]
            rows.append(chunk + [pad] * (seq_len - len(chunk)))
            owners.append(key)
            reals.append(len(chunk))
    return np.array(rows, dtype=np.uint32).reshape(-1, seq_len), owners, reals


@pytest.mark.parametrize("unit,seq_len,batch_docs", [("document", 16, 7), ("group", 16, 3), ("group", 37, 1024)])
def test_packing_by_unit_matches_naive_reference(tmp_path, tokenizer, unit, seq_len, batch_docs):
    docs = make_docs(90, seed=5)
    src = write_jsonl(tmp_path / "docs.jsonl", docs)
    out = prepare([src], tokenizer, seq_len, tmp_path / "prep", group_column="user", unit=unit,
                  batch_docs=batch_docs, progress=False)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    pad = sp.pad_id() if sp.pad_id() >= 0 else EOS
    tokens, owners, reals = naive_pack_by_unit(docs, sp, seq_len, unit, pad)
    ds = PackedDataset(out)
    assert ds.unit == unit and np.array_equal(ds.tokens, tokens)
    assert ds.real_tokens(np.arange(len(ds))).tolist() == reals
    names = ds.group_names
    keys = ds.sequence_units.tolist() if unit == "document" else [names[g] for g in ds.sequence_units]
    assert keys == owners
    # no sequence mixes two units: its documents all belong to its unit
    for i in range(len(ds)):
        assert {d if unit == "document" else docs[d]["user"] for d in ds.documents(i)} == {keys[i]}
    starts, counts = ds.unit_ranges()
    assert counts.sum() == len(ds) and len(starts) == len(dict.fromkeys(owners))
    assert all(len({keys[j] for j in range(s, s + c)}) == 1 for s, c in zip(starts, counts))
    info = ds.info
    assert info["num_units"] == len(starts) and info["max_unit_sequences"] == counts.max()
    assert info["padding_tokens"] == tokens.size - sum(reals) and info["num_tokens"] == sum(reals)
    assert info["dropped_tail_tokens"] == 0 and ds.manifest["tail"] == "padded"


def test_packing_by_group_holds_out_whole_groups(tmp_path, tokenizer):
    docs = [dict(d, user=f"u{(i * 7) % 20}") for i, d in enumerate(make_docs(200, seed=6))]
    src = write_jsonl(tmp_path / "docs.jsonl", docs)
    out = prepare([src], tokenizer, 24, tmp_path / "prep", group_column="user", unit="group",
                  eval_fraction=0.2, progress=False, batch_docs=9)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    pad = sp.pad_id() if sp.pad_id() >= 0 else EOS
    split_users = {}
    for split in ("train", "eval"):
        ds = PackedDataset(out, split)
        split_users[split] = {ds.group_names[g] for g in ds.sequence_units}
        # each split is exactly the naive unit packing of its own groups' documents
        own = [d for d in docs if d["user"] in split_users[split]]
        assert np.array_equal(ds.tokens, naive_pack_by_unit(own, sp, 24, "group", pad)[0])
    assert not split_users["train"] & split_users["eval"] and len(split_users["eval"]) == 4


def test_trainer_ignores_padding_of_unit_packed_sequences(tmp_path, tokenizer):
    from dptrain.train.batches import IGNORE, inputs_and_targets

    docs = make_docs(40, seed=8)
    out = prepare([write_jsonl(tmp_path / "docs.jsonl", docs)], tokenizer, 16, tmp_path / "prep",
                  unit="document", progress=False)
    ds = PackedDataset(out)
    slots = np.array([3, -1, 0, len(ds) - 1, 5])
    inputs, targets = inputs_and_targets(ds, slots, "cpu")
    for row, slot in enumerate(slots):
        real = 0 if slot < 0 else int(ds.real_tokens([slot])[0])
        for j in range(ds.seq_len - 1):
            expected = int(ds[slot][j + 1]) if j + 1 < real else IGNORE
            assert int(targets[row, j]) == expected
    assert (targets == IGNORE).any(dim=1)[slots >= 0].any()  # some sequence is padded


def test_packing_by_unit_errors(tmp_path, tokenizer):
    src = write_jsonl(tmp_path / "docs.jsonl", make_docs(20))
    with pytest.raises(UserError, match="group-column"):
        prepare([src], tokenizer, 16, tmp_path / "a", unit="group", progress=False)
    with pytest.raises(UserError, match="unit must be one of"):
        prepare([src], tokenizer, 16, tmp_path / "b", unit="user", progress=False)
    seq = PackedDataset(prepare([src], tokenizer, 16, tmp_path / "c", progress=False))
    assert seq.unit == "sequence" and (seq.real_tokens([0, 1]) == 16).all()
    with pytest.raises(UserError, match="packed by sequence"):
        seq.unit_ranges()


def test_memorization_windows_of_unit_packed_data_avoid_padding(tmp_path, tokenizer):
    from dptrain.audit.extraction import training_windows

    out = prepare([write_jsonl(tmp_path / "docs.jsonl", make_docs(90, seed=9))], tokenizer, 16,
                  tmp_path / "prep", unit="document", progress=False)
    ds = PackedDataset(out)
    real = ds.real_tokens(np.arange(len(ds)))
    full = np.asarray(ds.tokens)[real == ds.seq_len]
    assert 0 < len(full) < len(ds)  # some sequences are padded
    windows = training_windows(ds, len(ds), 10, seed=0).numpy()
    assert len(windows) == len(full)  # only full sequences are drawn
    for w in windows:
        assert any((row[s:s + 10] == w).all() for row in full for s in range(ds.seq_len - 9))
