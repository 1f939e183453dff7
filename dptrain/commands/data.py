"""`dptrain data prepare|demo|info`: tokenize and pack corpora into fixed-length privacy units."""
from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from pathlib import Path

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
    prep.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (the privacy unit)")
    prep.add_argument("--out", required=True, metavar="DIR")
    prep.add_argument("--text-column", default="text")
    prep.add_argument("--group-column", default=None,
                      help="user/group id column: recorded per sequence; eval holds out whole groups")
    prep.add_argument("--unit", choices=("sequence", "document", "group"), default="sequence",
                      help="privacy unit to pack by: with document or group no sequence mixes two units and "
                           "each unit's last sequence is padded (group needs --group-column)")
    prep.add_argument("--eval-fraction", type=float, default=0.0,
                      help="fraction of documents (or groups) held out for evaluation")
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


def run_prepare(args) -> int:
    from dptrain.data.prepare import prepare

    check_writable(args.out)
    with output_errors(args.out):
        out = prepare(args.input, args.tokenizer, args.seq_len, args.out, text_column=args.text_column,
                      group_column=args.group_column, eval_fraction=args.eval_fraction,
                      num_proc=args.num_proc, seed=args.seed, unit=args.unit)
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
