"""`dptrain export CHECKPOINT OUT_DIR`: write a checkpoint as a Hugging Face VaultGemma folder."""
from __future__ import annotations


def register(sub) -> None:
    parser = sub.add_parser("export", help="write a checkpoint as a Hugging Face VaultGemma folder")
    parser.add_argument("checkpoint", help="dptrain checkpoint folder")
    parser.add_argument("out_dir", help="folder to write (replaced if it exists)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="dtype of the stored weights (default float32)")
    parser.add_argument("--tokenizer", default=None,
                        help="SentencePiece .model (default: the checkpoint's tokenizer.model, if any)")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip reloading the export with transformers to compare logits")
    parser.set_defaults(func=run)


def run(args) -> int:
    from dptrain.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out_dir, args.tokenizer, args.dtype, args.verify)
    print(f"wrote {out} ({args.dtype}{', logits verified' if args.verify else ''})")
    return 0
