"""Read documents from local files (jsonl, json, parquet, csv, text, arrow) or a hub name via HF `datasets`."""
from __future__ import annotations

from pathlib import Path

from dptrain.errors import UserError

# File suffix -> `datasets` builder. Text files hold one document per line.
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv",
            ".txt": "text", ".text": "text", ".arrow": "arrow"}
COMPRESSION = (".gz", ".bz2", ".xz", ".zst")


def builder_for(path: Path) -> str:
    suffixes = [s for s in path.suffixes if s not in COMPRESSION]
    builder = BUILDERS.get(suffixes[-1].lower() if suffixes else "")
    if builder is None:
        raise UserError(f"{path}: unknown file type; use one of {', '.join(sorted(BUILDERS))}")
    return builder


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
    from datasets.exceptions import DatasetGenerationError

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
                ds = datasets.load_dataset(builder_for(item), data_files=str(item), split="train",
                                           cache_dir=str(cache_dir))
            else:
                ds = datasets.load_dataset(item, split="train", cache_dir=str(cache_dir))
        except UserError:
            raise
        except (DatasetGenerationError, ValueError, OSError, TypeError) as err:
            cause = err.__cause__ or err
            msg = " ".join(str(cause).split())[:300] or type(cause).__name__
            raise UserError(f"cannot read {item}: {msg}") from None
        missing = [c for c in columns if c not in ds.column_names]
        if missing:
            raise UserError(f"{item} has no column {missing[0]!r} (columns: {', '.join(ds.column_names)})")
        text_type = getattr(ds.features[columns[0]], "dtype", None)
        if text_type not in ("string", "large_string"):
            raise UserError(f"{item}: column {columns[0]!r} holds {ds.features[columns[0]]}, not text")
        parts.append(ds.select_columns(columns))
    for ds, item in zip(parts, inputs):
        if len(ds) == 0:
            raise UserError(f"input {item} holds no documents")
    if len(parts) == 1:
        return parts[0]
    try:
        return datasets.concatenate_datasets(parts)
    except ValueError as err:
        raise UserError(f"inputs have incompatible columns: {err}") from None
