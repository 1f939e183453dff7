"""Check that a prepared data set and a model config agree on the vocabulary."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from dptrain.errors import UserError

MAX_TOKEN_ID = "max_token_id"  # a split's largest token id, stored in the manifest by `prepare`
_CHUNK_TOKENS = 1 << 24
_computed: dict[tuple, int] = {}  # largest ids of folders prepared without one, by file identity


def largest_token_id(tokens: np.ndarray) -> int:
    """The largest id of a (memory-mapped) token array, read in chunks; -1 when it is empty."""
    flat = tokens.reshape(-1)
    return max((int(flat[i:i + _CHUNK_TOKENS].max()) for i in range(0, flat.size, _CHUNK_TOKENS)), default=-1)


def check_vocab(dataset_or_dir, model_cfg) -> None:
    """Raise UserError unless the data's tokenizer vocabulary equals the model's `vocab_size` and
    every token id of every split of the folder lies below it."""
    from dptrain.data.packed import PackedDataset

    ds = dataset_or_dir if isinstance(dataset_or_dir, PackedDataset) else PackedDataset(Path(dataset_or_dir))
    if ds.vocab_size != model_cfg.vocab_size:
        raise UserError(f"the data in {ds.path} was tokenized with a vocabulary of {ds.vocab_size} "
                        f"but the model has vocab_size {model_cfg.vocab_size}; they must match")
    for split, info in ds.manifest["splits"].items():
        largest = info.get(MAX_TOKEN_ID)
        if largest is None:  # prepared before the maximum was stored: read it from the tokens once
            largest = _largest_in_file(ds if split == ds.split else PackedDataset(ds.path, split))
        if int(largest) >= model_cfg.vocab_size:
            raise UserError(f"the data in {ds.path} holds token id {int(largest)} (in its {split} split) but the "
                            f"model has vocab_size {model_cfg.vocab_size}: every id must be below it; prepare the "
                            "data again with the model's tokenizer")


def _largest_in_file(split) -> int:
    path = (split.path / split.info["tokens_file"]).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if key not in _computed:
        _computed[key] = largest_token_id(split.tokens)
    return _computed[key]
