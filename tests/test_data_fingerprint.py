"""Content fingerprint of a prepared folder: same bytes anywhere -> same digest; a token changed in
place -> a different digest, which `verify_fingerprint` refuses."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dptrain.data import PackedDataset, prepare, train_tokenizer
from dptrain.data.demo import write_demo_corpus
from dptrain.data.fingerprint import content_fingerprint, data_files, verify_fingerprint
from dptrain.errors import UserError


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fingerprint")
    corpus = write_demo_corpus(root / "corpus", seed=2, num_records=40, num_public_paragraphs=200)
    tokenizer = train_tokenizer([corpus["public"]], 400, root / "public.model", num_threads=1)
    return prepare([corpus["private"]], tokenizer, 16, root / "prepared", group_column="user_id",
                   eval_fraction=0.2, progress=False, unit="group")


def copy_of(folder: Path, to: Path) -> Path:
    shutil.copytree(folder, to)
    return to


def test_prepare_records_the_content_fingerprint(prepared):
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert manifest["fingerprint"] == content_fingerprint(prepared) == verify_fingerprint(prepared)
    assert PackedDataset(prepared).fingerprint == manifest["fingerprint"]
    assert [p.name for p in data_files(prepared)] == sorted(
        ["eval.documents.bin", "eval.sequences.bin", "eval.tokens.bin", "groups.json", "tokenizer.model",
         "train.documents.bin", "train.sequences.bin", "train.tokens.bin"])


def test_a_copy_elsewhere_keeps_the_fingerprint(prepared, tmp_path):
    copy = copy_of(prepared, tmp_path / "moved" / "elsewhere")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["tokenizer"]["source_path"] = "/somewhere/else.model"  # paths are not hashed
    (copy / "manifest.json").write_text(json.dumps(manifest))
    (copy / "notes.txt").write_text("added beside the data\n")  # nor files that are not data
    assert content_fingerprint(copy) == content_fingerprint(prepared)
    assert verify_fingerprint(copy) == manifest["fingerprint"]


def test_one_token_changed_in_place_is_noticed(prepared, tmp_path):
    copy = copy_of(prepared, tmp_path / "copy")
    tokens = np.memmap(copy / "train.tokens.bin", dtype="<u4", mode="r+")
    tokens[len(tokens) // 2] ^= 1  # one token, same file size
    tokens.flush()
    del tokens
    data = PackedDataset(copy)  # still reads: the file has the expected size
    assert data.fingerprint != content_fingerprint(prepared)
    assert data.fingerprint == content_fingerprint(copy)  # computed from the bytes, not the manifest
    with pytest.raises(UserError, match="changed since it was prepared"):
        verify_fingerprint(copy)


def test_bytes_moved_between_files_change_the_fingerprint(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    for folder, (train, evals) in ((first, (b"abcd", b"efgh")), (second, (b"abcdef", b"gh"))):
        folder.mkdir()
        (folder / "train.tokens.bin").write_bytes(train)
        (folder / "eval.tokens.bin").write_bytes(evals)
    assert content_fingerprint(first) != content_fingerprint(second)


def test_a_folder_without_a_recorded_fingerprint_is_accepted(prepared, tmp_path):
    copy = copy_of(prepared, tmp_path / "old")
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["fingerprint"]  # prepared before fingerprints were recorded
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert verify_fingerprint(copy) == content_fingerprint(prepared)
    with pytest.raises(UserError, match="not a prepared data folder"):
        verify_fingerprint(tmp_path)


def test_the_demo_is_fingerprinted_and_reproducible_anywhere(tmp_path):
    from dptrain.data.demo import prepare_demo

    kwargs = dict(seq_len=64, vocab_size=512, num_records=200)
    out = prepare_demo(tmp_path / "a", **kwargs)
    assert (out / "canaries.json").exists()  # written after the manifest, and not hashed
    recorded = json.loads((out / "manifest.json").read_text())["fingerprint"]
    assert verify_fingerprint(out) == recorded
    assert verify_fingerprint(prepare_demo(tmp_path / "b", **kwargs)) == recorded
