"""`dptrain data prepare|demo|info`: tokenize and pack corpora into fixed-length privacy units."""
from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from pathlib import Path

DEFAULT_SEQ_LEN = 1024  # without a model to take it from
# Held out by default: split by document or group before packing, so no unit straddles the split.
DEFAULT_EVAL_FRACTION = 0.05
# Failures to write the output that are the user's to fix, not bugs.
WRITE_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR)


def register(sub) -> None:
    parser = sub.add_parser("data", help="prepare training data (tokenize, pack, split)")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    prep = actions.add_parser(
        "prepare", help="tokenize documents and pack them into seq-len sequences",
        description="Reads jsonl/json/parquet/csv/arrow/text files (text: one document per line), "
                    "folders of them, or a hub name; writes memory-mapped uint32 sequences and a "
                    "manifest into OUT (atomically).")
    prep.add_argument("--input", nargs="+", required=True, metavar="PATH")
    prep.add_argument("--tokenizer", required=True, help="SentencePiece .model")
    prep.add_argument("--model", default=None, metavar="CONFIG",
                      help="model config YAML (or checkpoint folder) the data is for: --seq-len defaults "
                           "from it and the tokenizer's vocabulary is checked against it")
    prep.add_argument("--seq-len", type=int, default=None,
                      help="tokens per sequence, the privacy unit (default: the --model's max_seq_len + 1, "
                           f"its whole context; {DEFAULT_SEQ_LEN} without --model)")
    prep.add_argument("--out", required=True, metavar="DIR")
    prep.add_argument("--text-column", default="text")
    prep.add_argument("--group-column", default=None,
                      help="user/group id column: recorded per sequence; eval holds out whole groups")
    prep.add_argument("--unit", choices=("sequence", "document", "group"), default="sequence",
                      help="privacy unit to pack by: with document or group no sequence mixes two units and "
                           "each unit's last sequence is padded (group needs --group-column)")
    prep.add_argument("--eval-fraction", type=float, default=None,
                      help="fraction of documents (or groups, with --group-column) held out for evaluation, "
                           f"never trained on (default {DEFAULT_EVAL_FRACTION}, or none when the corpus is "
                           "too small for a complete held-out sequence; 0 for none)")
    prep.add_argument("--num-proc", type=int, default=None, help="tokenizer threads (default: all cores)")
    prep.add_argument("--seed", type=int, default=0, help="seed of the eval split")
    prep.set_defaults(func=run_prepare)
    demo = actions.add_parser("demo", help="generate the bundled synthetic corpus and prepare it")
    demo.add_argument("--out", required=True, metavar="DIR", help="cache folder")
    demo.add_argument("--seq-len", type=int, default=128)
    demo.add_argument("--vocab-size", type=int, default=2048)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--num-records", type=int, default=6000)
    demo.set_defaults(func=run_demo)
    info = actions.add_parser("info", help="summarize a prepared folder")
    info.add_argument("dir")
    info.set_defaults(func=run_info)


def check_writable(out: str) -> None:
    """UserError unless `out`'s folder can be written: the nearest existing ancestor must be a
    writable folder (the output is made beside `out`, then renamed into place)."""
    from dptrain.errors import UserError

    parent = Path(out).absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"cannot write {out}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {out}: {parent} is not writable")


@contextmanager
def output_errors(out: str):
    """Turn a refused or failed write of the output (read-only, full disk) into one line."""
    from dptrain.errors import UserError

    folder = Path(out).absolute().parent
    try:
        yield
    except OSError as err:
        where = Path(err.filename).absolute() if err.filename else folder
        if err.errno not in WRITE_ERRNOS or not where.is_relative_to(folder):
            raise  # not the output: an input's problem, or a bug
        raise UserError(f"cannot write {out}: {err.strerror} ({where})") from None


def load_model_config(path: str):
    """The DecoderConfig of a model config YAML, or of a checkpoint folder's config.yaml."""
    from dptrain.errors import UserError
    from dptrain.model import DecoderConfig

    file = Path(path) / "config.yaml" if Path(path).is_dir() else Path(path)
    try:
        return DecoderConfig.from_yaml(file)
    except UserError as err:
        raise UserError(f"--model {path} is not a model config ({err}); give a file like "
                        "configs/model/tiny.yaml") from None


def sequence_length(requested: int | None, model_cfg) -> int:
    """--seq-len, or the model's whole context (max_seq_len inputs and their targets); a length
    beyond that is refused, since the trainer would refuse the data after it was prepared."""
    from dptrain.errors import UserError

    if model_cfg is None:
        return DEFAULT_SEQ_LEN if requested is None else requested
    longest = model_cfg.max_seq_len + 1
    if requested is not None and requested > longest:
        raise UserError(f"--seq-len {requested} is beyond the model's max_seq_len {model_cfg.max_seq_len} + 1; "
                        f"use at most {longest}")
    return longest if requested is None else requested


def check_tokenizer_fits(tokenizer: str, model_cfg) -> None:
    """UserError unless the tokenizer's vocabulary is the model's vocab_size (as training requires)."""
    from dptrain.data.tokenizer import load_tokenizer
    from dptrain.errors import UserError

    size = load_tokenizer(tokenizer).vocab_size()
    if size != model_cfg.vocab_size:
        raise UserError(f"tokenizer {tokenizer} has a vocabulary of {size}, the model's vocab_size is "
                        f"{model_cfg.vocab_size}: they must be equal (train the tokenizer with "
                        "`dptrain tokenizer train --model CONFIG`)")


def run_prepare(args) -> int:
    import sys

    from dptrain.data.prepare import prepare
    from dptrain.errors import UserError

    model_cfg = load_model_config(args.model) if args.model else None
    if model_cfg is not None:
        check_tokenizer_fits(args.tokenizer, model_cfg)
    seq_len = sequence_length(args.seq_len, model_cfg)
    fraction = DEFAULT_EVAL_FRACTION if args.eval_fraction is None else args.eval_fraction
    check_writable(args.out)

    def run(eval_fraction: float):
        with output_errors(args.out):
            return prepare(args.input, args.tokenizer, seq_len, args.out, text_column=args.text_column,
                           group_column=args.group_column, eval_fraction=eval_fraction,
                           num_proc=args.num_proc, seed=args.seed, unit=args.unit)

    try:
        out = run(fraction)
    except UserError as err:
        if args.eval_fraction is not None or "eval" not in str(err):
            raise
        # The default split did not fit this corpus: prepare it without one, and say so.
        print(f"dptrain data: note: no held-out split ({err}); pass --eval-fraction to choose one",
              file=sys.stderr)
        out = run(0.0)
    return run_info(type("Args", (), {"dir": out})())


def run_demo(args) -> int:
    from dptrain.data.demo import prepare_demo

    out = prepare_demo(args.out, seq_len=args.seq_len, vocab_size=args.vocab_size, seed=args.seed,
                       num_records=args.num_records, progress=True)
    run_info(type("Args", (), {"dir": out})())
    print(f"canaries    {out / 'canaries.json'}")
    return 0


def run_info(args) -> int:
    from dptrain.data.packed import PackedDataset

    train = PackedDataset(args.dir, "train")
    m = train.manifest
    print(f"prepared    {args.dir}")
    print(f"tokenizer   {train.tokenizer_path} (vocab {m['vocab_size']}, sha256 {m['tokenizer']['sha256'][:16]}...)")
    print(f"documents   {m['num_documents']} from {len(m['sources'])} source(s), "
          f"{m['skipped_empty_documents']} empty skipped"
          + (f", {m['num_groups']} groups in {m['group_column']!r}" if m["group_column"] else ""))
    for split, info in m["splits"].items():
        print(f"{split:<11} {info['num_sequences']} sequences x {m['seq_len']} tokens = "
              f"{info['num_tokens']} tokens from {info['num_documents']} documents "
              f"(tail of {info['dropped_tail_tokens']} tokens dropped)"
              + (", held out" if info["held_out"] else ""))
        if "num_units" in info:
            print(f"{'':<11} packed by {m['unit']}: {info['num_units']} units, up to {info['max_unit_sequences']} "
                  f"sequences each, {info['padding_tokens']} padding tokens (ignored)")
    return 0
