"""Check that a prepared data set and a model config agree on the vocabulary."""
from __future__ import annotations

from pathlib import Path

from dptrain.errors import UserError


def check_vocab(dataset_or_dir, model_cfg) -> None:
    """Raise UserError unless the data's tokenizer vocabulary equals the model's `vocab_size`."""
    from dptrain.data.packed import PackedDataset

    ds = dataset_or_dir if isinstance(dataset_or_dir, PackedDataset) else PackedDataset(Path(dataset_or_dir))
    if ds.vocab_size != model_cfg.vocab_size:
        raise UserError(f"the data in {ds.path} was tokenized with a vocabulary of {ds.vocab_size} "
                        f"but the model has vocab_size {model_cfg.vocab_size}; they must match")
