"""Build the scaling sweep's public text corpus from the Python standard library's own source.

The demo corpus is templated: every model of the ladder reaches the same loss floor (0.64 nats),
so model size barely matters and a scaling law fitted on it cannot be checked where it matters.
Python source is real text that every machine with Python carries, with structure at every scale
(names, idioms, docstrings), so the loss keeps falling with model size and steps on a CPU budget.

Training documents: the library's modules, one file per document; the tokenizer is trained on the
library's own test suites, a disjoint set of files. `corpus.json` records the Python version and
the SHA-256 of every input, so a sweep names exactly the text it was fitted on.

From the repository root: `python scaling/stdlib_corpus.py runs/stdlib-data` (about a minute).
"""
from __future__ import annotations

import argparse
import json
import platform
import sysconfig
from pathlib import Path

from dptrain.data.prepare import prepare
from dptrain.data.tokenizer import sha256_file, train_tokenizer

VOCAB_SIZE = 2048
SEQ_LEN = 64  # 63 predicted tokens per sequence, as in the demo-corpus sweeps
EVAL_FRACTION = 0.03
SKIP_DIRS = {"site-packages", "__pycache__"}  # installed packages differ from machine to machine
TEST_DIRS = {"test", "tests", "idle_test"}


def library_files(root: Path) -> tuple[list[Path], list[Path]]:
    """(module files, test files) under the standard library, sorted by relative path."""
    modules, tests = [], []
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        parts = set(path.relative_to(root).parts[:-1])
        if parts & SKIP_DIRS:
            continue
        (tests if parts & TEST_DIRS else modules).append(path)
    return modules, tests


def read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:  # a few test files are deliberately not UTF-8
        return None


def build(out: Path) -> dict:
    """Write the corpus, its tokenizer and `prepared/` into `out`; returns what `corpus.json` records."""
    root = Path(sysconfig.get_paths()["stdlib"])
    modules, tests = library_files(root)
    out.mkdir(parents=True, exist_ok=True)
    documents = out / "modules.jsonl"
    with documents.open("w", encoding="utf-8") as f:
        for path in modules:
            text = read_text(path)
            if text and text.strip():
                f.write(json.dumps({"text": text, "file": path.relative_to(root).as_posix()}) + "\n")
    tokenizer_text = out / "tests.txt"  # one line per sentence, as SentencePiece reads it
    with tokenizer_text.open("w", encoding="utf-8") as f:
        for path in tests:
            text = read_text(path)
            if text:
                f.writelines(line.rstrip() + "\n" for line in text.splitlines() if line.strip())
    tokenizer = train_tokenizer([tokenizer_text], VOCAB_SIZE, out / "tokenizer.model", num_threads=2)
    prepare([documents], tokenizer, SEQ_LEN, out / "prepared", eval_fraction=EVAL_FRACTION, seed=0)
    manifest = {
        "python": platform.python_version(), "module_files": len(modules), "test_files": len(tests),
        "modules_sha256": sha256_file(documents), "tokenizer_text_sha256": sha256_file(tokenizer_text),
        "vocab_size": VOCAB_SIZE, "seq_len": SEQ_LEN, "eval_fraction": EVAL_FRACTION,
    }
    (out / "corpus.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write (its prepared/ is the sweep's data)")
    print(json.dumps(build(parser.parse_args().out), indent=1))


if __name__ == "__main__":
    main()
