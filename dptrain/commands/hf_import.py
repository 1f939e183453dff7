"""`dptrain import HF_DIR CHECKPOINT`: start from an existing Hugging Face VaultGemma folder."""
from __future__ import annotations


def register(sub) -> None:
    parser = sub.add_parser("import", help="write a dptrain checkpoint from a Hugging Face VaultGemma folder")
    parser.add_argument("hf_dir", help="Hugging Face folder (config.json and safetensors weights)")
    parser.add_argument("checkpoint", help="dptrain checkpoint folder to write (replaced if it exists)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from dptrain.export import import_checkpoint

    out = import_checkpoint(args.hf_dir, args.checkpoint)
    print(f"wrote {out}")
    return 0
