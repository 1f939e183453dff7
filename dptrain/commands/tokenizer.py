"""`dptrain tokenizer train|info`: SentencePiece tokenizers with Gemma's special ids."""
from __future__ import annotations

import sys


def register(sub) -> None:
    parser = sub.add_parser("tokenizer", help="train or inspect a SentencePiece tokenizer")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    train = actions.add_parser(
        "train", help="train a byte-fallback BPE SentencePiece model (pad 0, eos 1, bos 2, unk 3)",
        description="Train on PUBLIC text: a tokenizer trained on private data is outside the DP "
                    "guarantee. Text files hold one sentence per line.")
    train.add_argument("--input", nargs="+", required=True, metavar="FILE", help="text files")
    train.add_argument("--vocab-size", type=int, default=None,
                       help="pieces in the vocabulary; must equal the model's vocab_size (default: "
                            "the --model's)")
    train.add_argument("--model", default=None, metavar="CONFIG",
                       help="model config YAML (or checkpoint folder) the tokenizer is for: "
                            "--vocab-size defaults from it, or is checked against it")
    train.add_argument("--out", required=True, help="output .model path (a .vocab goes beside it)")
    train.add_argument("--private", action="store_true",
                       help="the input is private data (warns; the result is not DP)")
    train.add_argument("--num-threads", type=int, default=None, help="default: all cores")
    train.set_defaults(func=run_train)
    info = actions.add_parser("info", help="vocabulary size, special ids and a sample encoding")
    info.add_argument("model", help=".model file")
    info.add_argument("--text", default="Hello world, 2026.", help="text to encode as a sample")
    info.set_defaults(func=run_info)


def vocabulary_size(requested: int | None, model: str | None) -> int:
    """--vocab-size, or the --model's vocab_size; UserError when neither is given or they differ."""
    from dptrain.commands.data import load_model_config
    from dptrain.errors import UserError

    if model is None:
        if requested is None:
            raise UserError("give --model CONFIG (the model config the tokenizer is for) or --vocab-size "
                            "N; the vocabulary must equal the model's vocab_size")
        return requested
    wanted = load_model_config(model).vocab_size
    if requested is not None and requested != wanted:
        raise UserError(f"--vocab-size {requested} differs from the vocab_size {wanted} of {model}: "
                        "a model trains only on data of its own vocabulary; leave --vocab-size out")
    return wanted


def run_train(args) -> int:
    import warnings

    from dptrain.data.tokenizer import PrivateTokenizerWarning, train_tokenizer

    args.vocab_size = vocabulary_size(args.vocab_size, args.model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PrivateTokenizerWarning)
        out = train_tokenizer(args.input, args.vocab_size, args.out, private=args.private,
                              num_threads=args.num_threads)
    for w in caught:
        print(f"dptrain tokenizer: warning: {w.message}", file=sys.stderr)
    print(f"wrote {out} (vocab {args.vocab_size})")
    return 0


def run_info(args) -> int:
    from dptrain.data.tokenizer import load_tokenizer, sha256_file

    sp = load_tokenizer(args.model)
    ids = sp.encode(args.text)
    print(f"model       {args.model}")
    print(f"sha256      {sha256_file(args.model)}")
    print(f"vocab size  {sp.vocab_size()}")
    print(f"special ids pad {sp.pad_id()}, eos {sp.eos_id()}, bos {sp.bos_id()}, unk {sp.unk_id()}")
    print(f"sample      {args.text!r} -> {ids} -> {[sp.id_to_piece(i) for i in ids]}")
    return 0
