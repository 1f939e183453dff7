"""Content fingerprint of a prepared folder: one SHA-256 over the bytes of its data files.

The manifest's paths and dates are left out, so a copied or moved folder keeps its fingerprint,
while any byte changed in place in a data file changes it. `prepare` stores the fingerprint in the
manifest (`"fingerprint"`); `verify_fingerprint` recomputes it and refuses a folder that no longer
matches.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from dptrain.data.prepare import (GROUPS_FILE, MANIFEST, SPLITS, TOKENIZER_FILE, documents_file,
                                  sequences_file, tokens_file)
from dptrain.errors import UserError

CHUNK_BYTES = 1 << 20
# Hashed first, so a future change of what is hashed never collides with this scheme.
SCHEME = b"dptrain-packed-content-v1\n"


def data_files(folder: str | Path) -> list[Path]:
    """The files `prepare` writes as data, sorted by name: every split's token, document and
    sequence arrays, the group names and the tokenizer. Not manifest.json, nor files added beside
    them later (the demo's canaries.json)."""
    folder = Path(folder)
    names = [name(split) for split in SPLITS for name in (tokens_file, documents_file, sequences_file)]
    names += [GROUPS_FILE, TOKENIZER_FILE]
    return [folder / name for name in sorted(names) if (folder / name).is_file()]


def content_fingerprint(folder: str | Path) -> str:
    """SHA-256 hex digest over the data files' names, lengths and bytes, streamed in 1 MiB chunks.

    Each file's name and length precede its bytes, so moving bytes from one file to the next (or
    renaming a file) changes the digest.
    """
    digest = hashlib.sha256(SCHEME)
    for path in data_files(folder):
        _hash_file(digest, path)
    return digest.hexdigest()


def _hash_file(digest, path: Path) -> None:
    name = path.name.encode()
    size = path.stat().st_size
    digest.update(len(name).to_bytes(8, "little") + name + size.to_bytes(8, "little"))
    left = size
    with open(path, "rb") as f:
        while left and (block := f.read(min(CHUNK_BYTES, left))):
            digest.update(block)
            left -= len(block)
        grew = bool(f.read(1))
    if left or grew:  # the length framed above would not describe the bytes hashed
        raise UserError(f"{path} changed while its content fingerprint was computed")


def verify_fingerprint(folder: str | Path) -> str:
    """The folder's content fingerprint; UserError when its manifest records a different one.

    Folders prepared before fingerprints were recorded are accepted as they are.
    """
    folder = Path(folder)
    recorded = _manifest(folder).get("fingerprint")
    actual = content_fingerprint(folder)
    if recorded is not None and recorded != actual:
        raise UserError(f"{folder} changed since it was prepared: its content fingerprint differs from "
                        "the manifest's")
    return actual


def _manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        raise UserError(f"{folder} is not a prepared data folder (no {MANIFEST})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is corrupt ({err})") from None
