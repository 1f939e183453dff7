"""Build a second public corpus for fitting a scaling law: Debian's package documentation.

Every Debian or Ubuntu machine carries it under /usr/share/doc: changelogs, NEWS and README files
(plain or gzipped), English prose about software, with version lists, names and dates; a corpus
unlike the Python source of `stdlib_corpus.py`, on which the shipped law was fitted. Training
documents: one file each; the tokenizer is trained on the packages' `copyright` files, a disjoint
set. `corpus.json` records the SHA-256 of the documents and of the tokenizer's text, so a law
fitted on it names exactly the text it holds for (another image's /usr/share/doc gives another
fingerprint, which `dptrain plan --data` then reports).

From the repository root: `python scaling/debian_corpus.py runs/debian-data` (about a minute).
"""
from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

from dptrain.data.prepare import prepare
from dptrain.data.tokenizer import sha256_file, train_tokenizer

DOC_ROOT = Path("/usr/share/doc")
VOCAB_SIZE = 2048
SEQ_LEN = 64  # 63 predicted tokens per sequence, as in the stdlib sweeps
EVAL_FRACTION = 0.03
DOCUMENT_PREFIXES = ("changelog", "news", "readme")
# Each document's first 16 KB (a changelog's newest entries): a few changelogs of megabytes would
# otherwise be most of the corpus, and the held-out loss (its first sequences) a few packages'.
MAX_CHARS = 16_384


def read_text(path: Path) -> str | None:
    """The file's text, gunzipped where needed; None when it is not UTF-8 text."""
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        return data.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError):
        return None


def documentation_files(root: Path) -> tuple[list[Path], list[Path]]:
    """(documents, tokenizer files): changelog/NEWS/README files and `copyright` files, sorted."""
    documents, copyrights = [], []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
        name = path.name.lower()
        if name == "copyright":
            copyrights.append(path)
        elif name.startswith(DOCUMENT_PREFIXES) and path.suffix in ("", ".gz", ".txt", ".md", ".Debian"):
            documents.append(path)
    return documents, copyrights


def build(out: Path, root: Path = DOC_ROOT) -> dict:
    """Write the corpus, its tokenizer and `prepared/` into `out`; returns what `corpus.json` records."""
    documents, copyrights = documentation_files(root)
    if not documents or not copyrights:
        raise SystemExit(f"no package documentation under {root}")
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "documents.jsonl"
    kept = 0
    with jsonl.open("w", encoding="utf-8") as f:
        for path in documents:
            text = read_text(path)
            if text and text.strip():
                f.write(json.dumps({"text": text[:MAX_CHARS], "file": path.relative_to(root).as_posix()}) + "\n")
                kept += 1
    tokenizer_text = out / "copyright.txt"  # one line per sentence, as SentencePiece reads it
    with tokenizer_text.open("w", encoding="utf-8") as f:
        for path in copyrights:
            text = read_text(path)
            if text:
                f.writelines(line.rstrip() + "\n" for line in text.splitlines() if line.strip())
    tokenizer = train_tokenizer([tokenizer_text], VOCAB_SIZE, out / "tokenizer.model", num_threads=2)
    prepare([jsonl], tokenizer, SEQ_LEN, out / "prepared", eval_fraction=EVAL_FRACTION, seed=0)
    manifest = {
        "corpus": "debian-doc", "root": str(root), "documents": kept, "copyright_files": len(copyrights),
        "documents_sha256": sha256_file(jsonl), "tokenizer_text_sha256": sha256_file(tokenizer_text),
        "max_chars": MAX_CHARS, "vocab_size": VOCAB_SIZE, "seq_len": SEQ_LEN, "eval_fraction": EVAL_FRACTION,
    }
    (out / "corpus.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write (its prepared/ is the sweep's data)")
    parser.add_argument("--root", type=Path, default=DOC_ROOT, help="documentation folder (default /usr/share/doc)")
    args = parser.parse_args()
    print(json.dumps(build(args.out, args.root), indent=1))


if __name__ == "__main__":
    main()
