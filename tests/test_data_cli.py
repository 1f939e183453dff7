"""`dptrain data prepare` and `dptrain tokenizer train` from the command line: mistakes in the
output folder and dead ends for own data, each one line and exit code 2."""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from dptrain.cli import main
from dptrain.data import train_tokenizer
from dptrain.data.demo import write_demo_corpus

VOCAB = 400


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    return write_demo_corpus(tmp_path_factory.mktemp("corpus") / "corpus", seed=1, num_records=64,
                             num_public_paragraphs=400)


@pytest.fixture(scope="module")
def tokenizer(corpus) -> Path:
    return train_tokenizer([corpus["public"]], VOCAB, corpus["public"].parent.parent / "public.model")


@pytest.fixture
def docs(tmp_path) -> Path:
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"note {i}: " + "patient account river " * (i % 9 + 1),
                                        "user": f"u{i % 20}"}) + "\n" for i in range(200)))
    return path


def one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dptrain "), err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_prepare_into_a_read_only_folder(tmp_path, tokenizer, docs, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert main(["data", "prepare", "--input", str(docs), "--tokenizer", str(tokenizer),
                     "--seq-len", "16", "--out", str(locked / "prep")]) == 2
    finally:
        locked.chmod(0o755)
    one_line_error(capsys, "cannot write", "not writable")


def test_prepare_refused_a_write_is_one_line(tmp_path, tokenizer, docs, capsys, monkeypatch):
    """What a read-only file system answers (root included): EROFS on the first write."""
    import tempfile

    out, real = tmp_path / "ro" / "prep", tempfile.mkdtemp

    def read_only(suffix=None, prefix=None, dir=None):
        if dir is not None and Path(dir) == out.parent:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dir))
        return real(suffix, prefix, dir)

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    assert main(["data", "prepare", "--input", str(docs), "--tokenizer", str(tokenizer),
                 "--seq-len", "16", "--out", str(out)]) == 2
    one_line_error(capsys, f"cannot write {out}", "Read-only file system")


def test_prepare_under_a_file_is_one_line(tmp_path, tokenizer, docs, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["data", "prepare", "--input", str(docs), "--tokenizer", str(tokenizer),
                 "--seq-len", "16", "--out", str(tmp_path / "file" / "prep")]) == 2
    one_line_error(capsys, "is not a folder")
