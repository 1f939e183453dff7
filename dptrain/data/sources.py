"""Read documents from local files (jsonl, json, parquet, csv, text, arrow) or a hub name via HF `datasets`."""
from __future__ import annotations

import bz2
import codecs
import gzip
import lzma
import re
from pathlib import Path

from dptrain.errors import UserError

# File suffix -> `datasets` builder. Text files hold one document per line.
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv",
            ".txt": "text", ".text": "text", ".arrow": "arrow"}
COMPRESSION = (".gz", ".bz2", ".xz", ".zst")
# Builders that decode the file's bytes as UTF-8 text (parquet and arrow store strings themselves).
TEXT_BUILDERS = ("json", "csv", "text")
_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_CHUNK_BYTES = 1 << 20


def builder_for(path: Path) -> str:
    suffixes = [s for s in path.suffixes if s not in COMPRESSION]
    builder = BUILDERS.get(suffixes[-1].lower() if suffixes else "")
    if builder is None:
        raise UserError(f"{path}: unknown file type; use one of {', '.join(sorted(BUILDERS))}")
    return builder


def check_utf8(path: str | Path, what: str = "input") -> None:
    """UserError naming the byte offset and line of the first bytes of `path` that are not UTF-8.

    Streams the file in 1 MiB blocks (gzip, bz2 and xz files decompressed; zstd ones are left to the
    reader). A read error of the file is a UserError too.
    """
    path = Path(path)
    compressed = [s for s in path.suffixes if s in COMPRESSION]
    opener = _OPENERS.get(compressed[-1]) if compressed else open
    if opener is None:
        return
    where = " of its decompressed text" if compressed else ""
    done, lines, pending = 0, 0, b""  # bytes decoded so far, newlines among them, an unfinished character
    try:
        with opener(path, "rb") as f:
            while True:
                block = f.read(_CHUNK_BYTES)
                data = pending + block
                try:
                    _, used = codecs.utf_8_decode(data, "strict", not block)
                except UnicodeDecodeError as err:
                    at, line = done + err.start, lines + data.count(b"\n", 0, err.start) + 1
                    raise UserError(f"{what} {path} is not UTF-8 text: byte 0x{data[err.start]:02x} at byte offset "
                                    f"{at}{where} (line {line}) is invalid; re-encode the file as UTF-8 (e.g. "
                                    f"`iconv -f latin1 -t utf-8`)") from None
                if not block:
                    return
                lines += data.count(b"\n", 0, used)
                done += used
                pending = data[used:]
    except (OSError, EOFError, lzma.LZMAError) as err:
        raise UserError(f"cannot read {what} {path}: {err}") from None


def expand_inputs(inputs: list[str | Path]) -> list[Path | str]:
    """Local files (folders expanded to their known files, sorted) or hub names, in order."""
    out: list[Path | str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")
                           and any(s in BUILDERS for s in p.suffixes))
            if not files:
                raise UserError(f"folder {path} holds no readable data files")
            out.extend(files)
        elif path.is_file():
            out.append(path)
        elif (str(item).count("/") == 1 and not str(item).startswith((".", "/"))
              and not any(s.lower() in BUILDERS for s in path.suffixes)):
            out.append(str(item))  # looks like a hub name, e.g. "org/corpus"
        else:
            raise UserError(f"input {item} does not exist")
    if not out:
        raise UserError("no input given")
    return out


def load_documents(inputs: list[Path | str], columns: list[str], cache_dir: Path):
    """One `datasets.Dataset` with exactly `columns`, inputs concatenated in the given order."""
    import datasets

    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # our own bar counts documents; theirs would interleave
    try:
        return _load(inputs, columns, cache_dir)
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()


def _load(inputs: list[Path | str], columns: list[str], cache_dir: Path):
    import datasets
    from datasets.exceptions import DatasetGenerationError

    parts = []
    for item in inputs:
        try:
            if isinstance(item, Path):
                if item.stat().st_size == 0:
                    raise UserError(f"input {item} is empty")
                builder = builder_for(item)
                if builder in TEXT_BUILDERS:
                    check_utf8(item)
                ds = datasets.load_dataset(builder, data_files=str(item), split="train",
                                           cache_dir=str(cache_dir))
            else:
                ds = datasets.load_dataset(item, split="train", cache_dir=str(cache_dir))
        except UserError:
            raise
        except (DatasetGenerationError, ValueError, OSError, TypeError) as err:
            cause = err.__cause__ or err
            msg = " ".join(str(cause).split())[:300] or type(cause).__name__
            if isinstance(cause, UnicodeDecodeError):
                msg += "; re-encode it as UTF-8"
            raise UserError(f"cannot read {item}: {msg}") from None
        missing = [c for c in columns if c not in ds.column_names]
        if missing:
            raise UserError(f"{item} has no column {missing[0]!r} (columns: {', '.join(ds.column_names)})")
        text_type = getattr(ds.features[columns[0]], "dtype", None)
        if text_type not in ("string", "large_string"):
            raise UserError(f"{item}: column {columns[0]!r} holds {ds.features[columns[0]]}, not text")
        ds = ds.select_columns(columns)
        if not isinstance(item, Path) or builder_for(item) not in TEXT_BUILDERS or item.suffix == ".zst":
            _check_strings(ds, item)  # what was not checked as bytes above
        parts.append(ds)
    for ds, item in zip(parts, inputs):
        if len(ds) == 0:
            raise UserError(f"input {item} holds no documents")
    if len(parts) == 1:
        return parts[0]
    try:
        return datasets.concatenate_datasets(parts)
    except ValueError as err:
        raise UserError(f"inputs have incompatible columns: {err}") from None


def _check_strings(ds, item) -> None:
    """UserError naming the first document whose text column (or group column) is not valid UTF-8."""
    import pyarrow as pa

    for name in ds.column_names:
        column = ds.data.column(name)
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            continue
        rows = 0
        for chunk in column.chunks:
            try:
                chunk.validate(full=True)
            except pa.ArrowInvalid as err:
                index = re.search(r"string index (\d+)", str(err))
                row = f"document {rows + int(index.group(1)) + 1}" if index else "a document"
                raise UserError(f"{item}: {row} has text in column {name!r} that is not UTF-8; re-encode the "
                                "data as UTF-8") from None
            rows += len(chunk)
