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


# --- own data without dead ends: the model config sets the vocabulary and the sequence length ----

@pytest.fixture
def model_config(tmp_path) -> Path:
    """The tiny model with the test tokenizer's vocabulary and a short context."""
    import yaml

    cfg = yaml.safe_load(Path("configs/model/tiny.yaml").read_text())
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump({**cfg, "vocab_size": VOCAB, "max_seq_len": 31}))
    return path


def test_tokenizer_vocabulary_defaults_from_the_model(tmp_path, corpus, model_config, capsys):
    import sentencepiece as spm

    out = tmp_path / "tok.model"
    assert main(["tokenizer", "train", "--input", str(corpus["public"]), "--model", str(model_config),
                 "--out", str(out), "--num-threads", "1"]) == 0
    assert f"(vocab {VOCAB})" in capsys.readouterr().out
    assert spm.SentencePieceProcessor(model_file=str(out)).vocab_size() == VOCAB


@pytest.mark.parametrize("args, needle", [
    ([], "give --model CONFIG"),
    (["--vocab-size", "300", "--model", "MODEL"], f"--vocab-size 300 differs from the vocab_size {VOCAB}"),
    (["--model", "configs/demo.yaml"], "is not a model config"),
])
def test_tokenizer_vocabulary_mistakes(tmp_path, corpus, model_config, capsys, args, needle):
    args = [str(model_config) if a == "MODEL" else a for a in args]
    assert main(["tokenizer", "train", "--input", str(corpus["public"]), "--out", str(tmp_path / "t.model"),
                 *args]) == 2
    one_line_error(capsys, needle)
    assert not (tmp_path / "t.model").exists()


def test_prepare_defaults_from_the_model_and_holds_out_a_split(tmp_path, tokenizer, docs, model_config,
                                                               capsys):
    out = tmp_path / "prep"
    assert main(["data", "prepare", "--input", str(docs), "--tokenizer", str(tokenizer),
                 "--model", str(model_config), "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seq_len"] == 32  # max_seq_len 31 inputs and their targets
    assert manifest["eval_fraction"] == 0.05 and manifest["splits"]["eval"]["held_out"]
    assert "held out" in capsys.readouterr().out


def test_prepare_without_room_for_the_default_split_says_so(tmp_path, tokenizer, capsys):
    few = tmp_path / "few.jsonl"
    few.write_text("".join(json.dumps({"text": "river bank account " * 20}) + "\n" for _ in range(5)))
    out = tmp_path / "prep"
    assert main(["data", "prepare", "--input", str(few), "--tokenizer", str(tokenizer), "--seq-len", "16",
                 "--out", str(out)]) == 0
    assert "note: no held-out split" in capsys.readouterr().err
    assert set(json.loads((out / "manifest.json").read_text())["splits"]) == {"train"}


@pytest.mark.parametrize("args, needle", [
    (["--seq-len", "64"], "--seq-len 64 is beyond the model's max_seq_len 31 + 1"),
    (["--tokenizer", "OTHER"], f"the model's vocab_size is {VOCAB}"),
])
def test_prepare_checks_the_data_against_the_model(tmp_path, corpus, tokenizer, docs, model_config, capsys,
                                                   args, needle):
    if "OTHER" in args:
        other = train_tokenizer([corpus["public"]], VOCAB - 20, tmp_path / "other.model")
        args = ["--tokenizer", str(other)]
    else:
        args = ["--tokenizer", str(tokenizer), *args]
    out = tmp_path / "prep"
    assert main(["data", "prepare", "--input", str(docs), "--model", str(model_config), "--out", str(out),
                 *args]) == 2
    one_line_error(capsys, needle)
    assert not out.exists()


def subcommand_parsers(parser, prefix=()):
    """(name, parser) of every command and subcommand under `parser`."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name), sub
                yield from subcommand_parsers(sub, (*prefix, name))


def test_every_help_shows_the_defaults():
    import argparse

    from dptrain.cli import build_parser

    flags = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._HelpAction)
    missing = []
    for name, parser in subcommand_parsers(build_parser()):
        text = "".join(parser.format_help().split())  # wrapping may break a line anywhere
        for action in parser._actions:
            if action.option_strings and action.default not in (None, argparse.SUPPRESS) \
                    and not isinstance(action, flags) and "default" not in (action.help or ""):
                shown = f"{action.default:g}" if isinstance(action.default, float) else str(action.default)
                if f"default:{shown}".replace(" ", "") not in text:
                    missing.append(f"{' '.join(name)} {action.option_strings[0]}")
    assert not missing, missing
