"""The training data as the loop sees it: the prepared splits, checked against the model, and
next-token (inputs, targets) tensors of the sampled slots."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dptrain.data import PackedDataset, check_vocab
from dptrain.errors import UserError

IGNORE = -100


def open_data(data_cfg, main_first) -> tuple[PackedDataset, PackedDataset | None]:
    """The training split and the held-out one (None when absent or empty). `main_first`: a context
    in which one rank builds the demo folder before the others read it."""
    path = Path(data_cfg.path)
    if data_cfg.source == "demo":
        from dptrain.data.demo import prepare_configured_demo

        with main_first():
            path = prepare_configured_demo(data_cfg)
    if not path.is_dir():
        raise UserError(f"data.path {path} does not exist: run `dptrain data prepare` first")
    train = PackedDataset(path, split="train")
    if len(train) == 0:
        raise UserError(f"data.path {path} holds no training sequences")
    try:
        held_out = PackedDataset(path, split="eval")
    except UserError:
        held_out = None
    return train, (held_out if held_out is not None and len(held_out) else None)


def check_fits_model(data: PackedDataset, model_cfg) -> None:
    check_vocab(data, model_cfg)
    if data.seq_len - 1 > model_cfg.max_seq_len:
        raise UserError(f"sequences of {data.seq_len} tokens exceed model.max_seq_len {model_cfg.max_seq_len} + 1")


def unit_ranges(data: PackedDataset, unit: str, demo: bool = False) -> tuple[np.ndarray, np.ndarray] | None:
    """(first row, row count) of every unit; None when the unit is one sequence. `demo`: the data is
    the bundled demo, packed by `data.demo_unit`."""
    if unit == "sequence":
        return None
    if data.unit != unit:
        fix = (f"set data.demo_unit: {unit}" if demo else f"prepare it with `dptrain data prepare --unit {unit}`")
        raise UserError(f"privacy.unit is {unit} but {data.path} is packed by {data.unit}: {fix}")
    return data.unit_ranges()


def inputs_and_targets(data: PackedDataset, slots: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token pairs of the sequences at `slots`; slot -1 is a padding example, all ignored, and so
    are the positions past a unit-packed sequence's real tokens."""
    real = slots >= 0
    tokens = torch.zeros(len(slots), data.seq_len, dtype=torch.long)
    lengths = np.zeros(len(slots), dtype=np.int64)
    if real.any():
        tokens[torch.from_numpy(real)] = data.batch(slots[real])
        lengths[real] = data.real_tokens(slots[real])
    targets = tokens[:, 1:].clone()
    # target j is token j + 1: kept only while j + 1 is a real token
    targets[torch.arange(data.seq_len - 1)[None, :] + 1 >= torch.from_numpy(lengths)[:, None]] = IGNORE
    return tokens[:, :-1].to(device), targets.to(device)
