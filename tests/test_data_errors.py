"""Data the model cannot take: token ids beyond its vocabulary, and corpora that are not UTF-8."""
from __future__ import annotations

import dataclasses
import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dptrain.cli import main
from dptrain.data import PackedDataset, check_vocab, prepare, train_tokenizer
from dptrain.data.demo import write_demo_corpus
from dptrain.errors import UserError
from dptrain.model import DecoderConfig

VOCAB = 400
SEQ_LEN = 16


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    public = write_demo_corpus(folder / "corpus", seed=1, num_records=16, num_public_paragraphs=200)["public"]
    return train_tokenizer([public], VOCAB, folder / "public.model", num_threads=1)


def write_docs(path: Path, n: int = 60) -> Path:
    words = "alpha beta gamma delta river bank note 2024".split()
    path.write_text("".join(json.dumps({"text": " ".join(words[(i + j) % len(words)] for j in range(9))}) + "\n"
                            for i in range(n)))
    return path


@pytest.fixture
def prepared(tmp_path, tokenizer) -> Path:
    return prepare([write_docs(tmp_path / "docs.jsonl")], tokenizer, SEQ_LEN, tmp_path / "prep",
                   eval_fraction=0.2, progress=False)


def model_config(vocab_size: int = VOCAB) -> DecoderConfig:
    return dataclasses.replace(DecoderConfig.from_yaml("configs/model/tiny.yaml"), vocab_size=vocab_size)


def put_token(folder: Path, split: str, token: int, *, stored: bool) -> None:
    """Overwrite one token of `split` with `token`; record it as the stored maximum, or (an old-style
    folder) drop every split's stored maximum."""
    manifest = json.loads((folder / "manifest.json").read_text())
    info = manifest["splits"][split]
    tokens = np.memmap(folder / info["tokens_file"], dtype="<u4", mode="r+")
    tokens[3] = token
    tokens.flush()
    del tokens
    for name, split_info in manifest["splits"].items():
        if not stored:
            split_info.pop("max_token_id", None)
        elif name == split:
            split_info["max_token_id"] = max(split_info.get("max_token_id", token), token)
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


def test_prepare_stores_the_largest_token_id_of_every_split(prepared):
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert set(manifest["splits"]) == {"train", "eval"}
    for split, info in manifest["splits"].items():
        assert info["max_token_id"] == int(np.asarray(PackedDataset(prepared, split).tokens).max())
        assert 0 < info["max_token_id"] < VOCAB
    check_vocab(prepared, model_config())


@pytest.mark.parametrize("split", ["train", "eval"])
def test_check_vocab_refuses_ids_beyond_the_vocabulary(prepared, split):
    put_token(prepared, split, VOCAB + 7, stored=True)
    with pytest.raises(UserError) as err:
        check_vocab(PackedDataset(prepared, "train"), model_config())
    message = str(err.value)
    assert str(prepared) in message and f"token id {VOCAB + 7}" in message and f"vocab_size {VOCAB}" in message
    assert f"{split} split" in message and "\n" not in message


@pytest.mark.parametrize("split", ["train", "eval"])
def test_check_vocab_reads_the_largest_id_of_an_old_folder(prepared, split):
    put_token(prepared, "train", 5, stored=False)  # old-style manifest: no maximum stored, ids all fit
    check_vocab(prepared, model_config())
    put_token(prepared, split, VOCAB, stored=False)
    assert "max_token_id" not in json.loads((prepared / "manifest.json").read_text())["splits"][split]
    with pytest.raises(UserError, match=rf"{prepared}.* holds token id {VOCAB} \(in its {split} split\) but the "
                                        rf"model has vocab_size {VOCAB}"):
        check_vocab(prepared, model_config())


def test_trainer_refuses_ids_beyond_the_vocabulary(prepared, tmp_path):
    from dptrain.train.trainer import Trainer
    from tiny_runs import tiny_run_config

    put_token(prepared, "eval", VOCAB + 1, stored=True)
    defaults = {"privacy": {"noise_multiplier": 1.0, "delta": 1e-5, "expected_batch_size": 4, "steps": 2},
                "runtime": {"micro_batch_size": 4, "device": "cpu"}}
    cfg = tiny_run_config(prepared, tmp_path / "run", defaults, model={"vocab_size": VOCAB})
    with pytest.raises(UserError, match=rf"holds token id {VOCAB + 1} \(in its eval split\)"):
        Trainer(cfg)


def test_canary_copy_updates_the_stored_maximum(prepared, tmp_path):
    from dptrain.audit.dataset import write_canary_dataset

    base_max = json.loads((prepared / "manifest.json").read_text())["splits"]["train"]["max_token_id"]
    canaries = torch.full((2, SEQ_LEN), VOCAB - 1, dtype=torch.long)
    out = write_canary_dataset(prepared, canaries, np.array([True, False]), tmp_path / "canaries")
    assert base_max < VOCAB - 1
    assert json.loads((out / "manifest.json").read_text())["splits"]["train"]["max_token_id"] == VOCAB - 1
    check_vocab(out, model_config())


# --- corpora that are not UTF-8 ----------------------------------------------------------------

LATIN1 = "caf\u00e9 au lait na\u00efve".encode("latin-1")


def bad_corpus(folder: Path, kind: str) -> Path:
    """A corpus whose third line holds latin-1 bytes."""
    lines = [b"first line of text here", b"second line of text here", LATIN1, b"fourth line"]
    if kind == "csv":
        lines = [b"text"] + lines[1:]
    if kind.startswith("jsonl"):
        lines = [b'{"text": "' + line + b'"}' for line in lines]
    data = b"\n".join(lines) + b"\n"
    path = folder / f"corpus.{kind}"
    path.write_bytes(gzip.compress(data) if kind.endswith(".gz") else data)
    return path


@pytest.mark.parametrize("kind", ["jsonl", "txt", "csv", "jsonl.gz"])
def test_prepare_refuses_a_corpus_that_is_not_utf8(tmp_path, tokenizer, kind, capsys):
    src = bad_corpus(tmp_path, kind)
    out = tmp_path / "prep"
    code = main(["data", "prepare", "--input", str(src), "--tokenizer", str(tokenizer), "--seq-len", "4",
                 "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    line = err.strip().splitlines()
    assert len(line) == 1 and str(src) in line[0]
    assert "not UTF-8" in line[0] and "(line 3)" in line[0] and "re-encode" in line[0]
    assert not out.exists()


def test_tokenizer_training_refuses_text_that_is_not_utf8(tmp_path, capsys):
    good = tmp_path / "good.txt"
    good.write_text("".join(f"plain public text, line {i}\n" for i in range(400)))
    bad = bad_corpus(tmp_path, "txt")
    code = main(["tokenizer", "train", "--input", str(good), str(bad), "--vocab-size", "300",
                 "--out", str(tmp_path / "tok.model")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert str(bad) in err and "byte 0xe9 at byte offset 52 (line 3)" in err and "re-encode" in err
    assert not (tmp_path / "tok.model").exists()
