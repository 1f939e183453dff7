"""`dptrain eval MODEL --data PREPARED`: held-out loss and perplexity of a checkpoint or an export.

The loss is the mean token cross-entropy (nats), the same number as a training run's held-out
loss; perplexity is its exponential. It is computed on the data without noise, so it is outside
the (epsilon, delta) guarantee, and the command says so with every result.
"""
from __future__ import annotations

import json
import math
import sys
from contextlib import nullcontext

NOTES = {
    "eval": "privacy: this loss is computed without noise on the held-out split, which training never "
            "samples and which has no guarantee of its own: a statistic of that data, outside the "
            "(epsilon, delta) guarantee",
    "train": "privacy: this loss is computed without noise on the training split: a statistic of the "
             "training data, outside the (epsilon, delta) guarantee",
}


def register(sub) -> None:
    parser = sub.add_parser(
        "eval", help="held-out loss and perplexity of a checkpoint or an export",
        description="The mean token cross-entropy (nats) on a prepared split, as a training run's "
                    "held-out loss, and its exponential, the perplexity. Computed without noise: "
                    "outside the (epsilon, delta) guarantee, and printed with a line saying so.")
    parser.add_argument("model", metavar="CHECKPOINT_OR_EXPORT",
                        help="dptrain checkpoint folder or Hugging Face export folder")
    parser.add_argument("--data", required=True, metavar="PREPARED", help="prepared data folder")
    parser.add_argument("--split", choices=sorted(NOTES), default="eval",
                        help="which split to score (default eval)")
    parser.add_argument("--max-sequences", type=int, default=None, metavar="N",
                        help="score the first N sequences of the split (default: all)")
    parser.add_argument("--micro-batch", type=int, default=16,
                        help="sequences per forward pass (default 16)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def open_split(data: str, split: str):
    """The split as a PackedDataset; a folder without a held-out split gets the way to make one."""
    from dptrain.data import PackedDataset
    from dptrain.errors import UserError

    train = PackedDataset(data, "train")
    if split == "train":
        return train
    if split not in train.manifest["splits"]:
        raise UserError(f"{data} has no {split} split: prepare it with `dptrain data prepare "
                        "--eval-fraction 0.05 ...`, or score --split train (a statistic of the "
                        "training data, outside the guarantee)")
    return PackedDataset(data, split)


def check_model_fits_data(model, data, model_dir: str) -> None:
    """UserError unless the data was tokenized for this model: vocabulary, token ids, context, and
    the same tokenizer file when the model folder carries one."""
    from pathlib import Path

    from dptrain.data import check_vocab
    from dptrain.data.tokenizer import sha256_file
    from dptrain.errors import UserError
    from dptrain.export import TOKENIZER_FILE

    check_vocab(data, model.cfg)
    if data.seq_len - 1 > model.cfg.max_seq_len:
        raise UserError(f"the data's sequences are {data.seq_len} tokens ({data.seq_len - 1} inputs), "
                        f"beyond the model's max_seq_len {model.cfg.max_seq_len}: prepare it with "
                        f"--seq-len {model.cfg.max_seq_len + 1} or less")
    ours = Path(model_dir) / TOKENIZER_FILE
    if ours.is_file() and sha256_file(ours) != data.manifest["tokenizer"]["sha256"]:
        raise UserError(f"{data.path} was tokenized with another tokenizer than {ours}: the loss "
                        "would mean nothing; prepare the data with the model's tokenizer")


def scored_tokens(data, n: int) -> int:
    """Next-token targets in the first `n` sequences (a padded sequence has fewer)."""
    import numpy as np

    return int(np.maximum(data.real_tokens(np.arange(n)) - 1, 0).sum())


def run(args) -> int:
    from dptrain.commands.sample import load_model_folder, model_folder, torch_device
    from dptrain.errors import UserError
    from dptrain.train.evaluation import heldout_loss

    if args.max_sequences is not None and args.max_sequences < 1:
        raise UserError(f"--max-sequences must be at least 1, got {args.max_sequences}")
    if args.micro_batch < 1:
        raise UserError(f"--micro-batch must be at least 1, got {args.micro_batch}")
    data = open_split(args.data, args.split)
    args.model = model_folder(args.model)
    model = load_model_folder(args.model)
    check_model_fits_data(model, data, args.model)
    device = torch_device(args.device)
    n = len(data) if args.max_sequences is None else min(len(data), args.max_sequences)
    if n == 0:
        raise UserError(f"the {args.split} split of {args.data} holds no sequence")
    loss = heldout_loss(model.to(device), data, n, args.micro_batch, device, nullcontext)
    result = {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf,
              "split": args.split, "sequences": n, "tokens": scored_tokens(data, n),
              "model": str(args.model), "data": str(args.data)}
    if args.json:
        print(json.dumps({**result, "privacy": NOTES[args.split]}))
        print(NOTES[args.split], file=sys.stderr)
    else:
        print(f"{args.split} loss {loss:.4f} nats/token, perplexity {result['perplexity']:.4g}, over "
              f"{n:,} sequences ({result['tokens']:,} tokens) of {args.data}")
        print(NOTES[args.split])
    return 0
