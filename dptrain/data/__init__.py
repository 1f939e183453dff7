"""Data: SentencePiece tokenizers, packing documents into fixed-length privacy units, the demo corpus."""
from dptrain.data.packed import PackedDataset
from dptrain.data.prepare import prepare
from dptrain.data.tokenizer import load_tokenizer, train_tokenizer
from dptrain.data.vocab import check_vocab

__all__ = ["PackedDataset", "prepare", "load_tokenizer", "train_tokenizer", "check_vocab"]
