"""The bundled demo corpus: deterministic bytes, canaries planted exactly as listed, cached preparation."""
from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from dptrain.cli import main
from dptrain.data import PackedDataset
from dptrain.data.demo import CANARY_REPEATS, make_canaries, prepare_demo, write_demo_corpus


def read_bytes(paths: dict) -> dict:
    return {k: Path(p).read_bytes() for k, p in paths.items()}


def test_corpus_is_deterministic(tmp_path):
    a = write_demo_corpus(tmp_path / "a", seed=3, num_records=300, num_public_paragraphs=100)
    b = write_demo_corpus(tmp_path / "b", seed=3, num_records=300, num_public_paragraphs=100)
    c = write_demo_corpus(tmp_path / "c", seed=4, num_records=300, num_public_paragraphs=100)
    assert read_bytes(a) == read_bytes(b)
    assert all(read_bytes(a)[k] != read_bytes(c)[k] for k in a)


def test_canaries_are_planted_as_listed(tmp_path):
    paths = write_demo_corpus(tmp_path / "corpus", seed=0, num_records=400, num_public_paragraphs=200)
    records = [json.loads(line) for line in paths["private"].read_text().splitlines()]
    canaries = json.loads(paths["canaries"].read_text())
    assert sorted({c["repeats"] for c in canaries}) == sorted(CANARY_REPEATS)
    assert len({c["secret"] for c in canaries}) == len(canaries)
    public = paths["public"].read_text()
    for canary in canaries:
        holders = [i for i, r in enumerate(records) if canary["text"] in r["text"]]
        assert holders == canary["records"] and len(holders) == canary["repeats"]
        assert sum(r["text"].count(canary["secret"]) for r in records) == canary["repeats"]
        assert canary["text"] == canary["prefix"] + canary["secret"] + "."
        assert canary["secret"] not in public
    assert [c["text"] for c in canaries] == [c["text"] for c in make_canaries(0)]
    assert {r["kind"] for r in records} == {"clinical_note", "support_chat"}
    assert all(r["user_id"].startswith("user-") for r in records)


def test_prepare_demo_trains_on_public_text_and_caches(tmp_path):
    kwargs = dict(seq_len=64, vocab_size=512, num_records=400)
    start = time.perf_counter()
    out = prepare_demo(tmp_path, **kwargs)
    first = time.perf_counter() - start
    train, evals = PackedDataset(out, "train"), PackedDataset(out, "eval")
    assert train.seq_len == 64 and train.vocab_size == 512 and len(train) > 100 and len(evals) > 0
    # the tokenizer is the one trained on the public text only
    public_model = next(tmp_path.glob("tokenizer-*.model"))
    assert train.manifest["tokenizer"]["source_path"] == str(public_model.resolve())
    assert [Path(s["path"]).name for s in train.manifest["sources"]] == ["private.jsonl"]
    # every planted canary is in the training split as often as planted, never in eval
    canaries = json.loads((out / "canaries.json").read_text())
    assert [(c["train_repeats"], c["eval_repeats"]) for c in canaries] == [(c["repeats"], 0) for c in canaries]
    sp = spm.SentencePieceProcessor(model_file=str(train.tokenizer_path))
    text = sp.decode(np.concatenate([train[i] for i in range(len(train))]).tolist())
    for c in canaries:
        assert text.count(c["secret"]) == c["repeats"]
    # cached: the second call does no work and rewrites nothing
    stamp = (out / "train.tokens.bin").stat().st_mtime_ns
    start = time.perf_counter()
    assert prepare_demo(tmp_path, **kwargs) == out
    assert time.perf_counter() - start < first / 3
    assert (out / "train.tokens.bin").stat().st_mtime_ns == stamp
    other = prepare_demo(tmp_path, **{**kwargs, "seq_len": 32})
    assert other != out and PackedDataset(other).seq_len == 32
    # reproducible from scratch elsewhere: same tokenizer bytes, same sequences
    again = prepare_demo(tmp_path / "again", **kwargs)
    assert (again / "tokenizer.model").read_bytes() == (out / "tokenizer.model").read_bytes()
    assert (again / "train.tokens.bin").read_bytes() == (out / "train.tokens.bin").read_bytes()


def test_cli_demo(tmp_path, capsys):
    rc = main(["data", "demo", "--out", str(tmp_path), "--seq-len", "32", "--vocab-size", "512",
               "--num-records", "200"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "canaries" in printed and "held out" in printed


def test_one_user_canaries_stay_in_one_users_records(tmp_path):
    """`canary_owner="one-user"`: every copy of a canary is in distinct records of its one owner."""
    kwargs = dict(seed=0, num_records=6_000, num_public_paragraphs=50)
    spread = write_demo_corpus(tmp_path / "spread", **kwargs)
    paths = write_demo_corpus(tmp_path / "one", canary_owner="one-user", **kwargs)
    records = [json.loads(line) for line in paths["private"].read_text().splitlines()]
    canaries = json.loads(paths["canaries"].read_text())
    owners = [c["owner"] for c in canaries if c["repeats"] > 0]
    assert len(set(owners)) == len(owners)  # one owner per canary, none shared
    for canary in canaries:
        holders = [i for i, r in enumerate(records) if canary["text"] in r["text"]]
        assert holders == canary["records"] and len(holders) == canary["repeats"]
        assert {records[i]["user_id"] for i in holders} == ({canary["owner"]} if canary["repeats"] else set())
    # only the canaries moved: the records without them and the public text are the default's
    default = [json.loads(line) for line in spread["private"].read_text().splitlines()]
    assert [r["user_id"] for r in records] == [r["user_id"] for r in default]
    assert paths["public"].read_bytes() == spread["public"].read_bytes()
    canary_texts = [c["text"] for c in canaries]
    clean = lambda rs: [functools.reduce(lambda t, c: t.replace(" " + c, ""), canary_texts, r["text"]) for r in rs]  # noqa: E731
    assert clean(records) == clean(default)
    with pytest.raises(ValueError, match="canary_owner"):
        write_demo_corpus(tmp_path / "bad", canary_owner="everyone", **kwargs)


def test_prepare_demo_one_user_by_group(tmp_path):
    """The audit config's demo folder: packed by user, every secret's copies in its owner's unit."""
    from dptrain.train.config import load_train_config

    data = load_train_config("configs/demo-units-audit.yaml").data
    assert (data.demo_canary_owner, data.demo_unit, data.demo_records) == ("one-user", "group", 2_000)
    out = prepare_demo(tmp_path, seq_len=64, vocab_size=512, num_records=data.demo_records,
                       canary_owner=data.demo_canary_owner, unit=data.demo_unit)
    assert out != prepare_demo(tmp_path, seq_len=64, vocab_size=512, num_records=data.demo_records)  # own cache
    from dataclasses import replace

    from dptrain.data.demo import prepare_configured_demo
    # what the trainer builds from the config's demo_* fields (here at a smaller size and vocabulary)
    assert prepare_configured_demo(replace(data, path=str(tmp_path), demo_seq_len=64, demo_vocab_size=512)) == out
    train = PackedDataset(out, "train")
    assert train.manifest["unit"] == "group"
    canaries = json.loads((out / "canaries.json").read_text())
    assert [(c["train_repeats"], c["eval_repeats"]) for c in canaries] == [(c["repeats"], 0) for c in canaries]
