"""A tiny decoder trained on a small slice of the demo corpus: the shared setup of the training tests."""
from __future__ import annotations

from dptrain import configio
from dptrain.train.config import TrainConfig

VOCAB = 512


def demo_data(folder):
    from dptrain.data.demo import prepare_demo

    return prepare_demo(folder, seq_len=32, vocab_size=VOCAB, num_records=400)


def tiny_run_config(data_dir, out_dir, defaults: dict, **sections) -> TrainConfig:
    """A training config of a 2-layer decoder on `data_dir`; `defaults` then `sections` update it
    section by section (a dict merges into its section, anything else replaces it)."""
    raw = {
        "model": dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                      num_kv_heads=1, head_dim=16, max_seq_len=64, query_pre_attn_scalar=16.0),
        "data": {"path": str(data_dir)},
        "out_dir": str(out_dir),
        "logging": {"wandb": "disabled", "progress": False},
    }
    for update in (defaults, sections):
        for section, values in update.items():
            raw[section] = {**raw.get(section, {}), **values} if isinstance(values, dict) else values
    return configio.from_dict(TrainConfig, raw)


def demo_by_user(data_dir, folder, seq_len: int):
    """The demo corpus of `data_dir` packed by user: a unit is one user's sequences."""
    from dptrain.data import prepare

    demo = data_dir.parent
    return prepare([next(demo.glob("corpus-*")) / "private.jsonl"], next(demo.glob("tokenizer-*.model")), seq_len,
                   folder / "prep", group_column="user_id", unit="group", eval_fraction=0.1, progress=False)
