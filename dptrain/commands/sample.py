"""`dptrain sample MODEL --prompt TEXT`: continue a prompt with a checkpoint or a Hugging Face export.

MODEL is a dptrain checkpoint folder (config.yaml) or a Hugging Face export (config.json); either
carries the tokenizer as `tokenizer.model` (or give `--tokenizer`). The weights are public, so a
sample releases nothing beyond them.
"""
from __future__ import annotations

import sys
from pathlib import Path

DEFAULT_TOKENS = 64


def register(sub) -> None:
    parser = sub.add_parser(
        "sample", help="continue a prompt with a checkpoint or a Hugging Face export",
        description="Prints the prompt and its continuation. The model's tokenizer.model is used "
                    "unless --tokenizer is given.")
    parser.add_argument("model", metavar="CHECKPOINT_OR_EXPORT",
                        help="dptrain checkpoint folder or Hugging Face export folder")
    parser.add_argument("--prompt", required=True, help="text to continue (may be empty)")
    parser.add_argument("--tokens", type=int, default=None,
                        help=f"new tokens (default {DEFAULT_TOKENS}, or what fits in the model's context)")
    parser.add_argument("--temperature", type=float, default=0.8,
                        help="softmax temperature; 0 picks the most likely token (default 0.8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draws (default 0)")
    parser.add_argument("--tokenizer", default=None,
                        help="SentencePiece .model (default: the folder's tokenizer.model)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.set_defaults(func=run)


def model_folder(path: str | Path) -> Path:
    """`path`, or for a run folder (one with checkpoints/ and no model of its own) its newest checkpoint."""
    path = Path(path)
    if not (path / "config.json").is_file() and not (path / "config.yaml").is_file():
        done = sorted(c for c in (path / "checkpoints").glob("step-*") if (c / "config.yaml").is_file())
        if done:
            print(f"using the run's newest checkpoint, {done[-1]}", file=sys.stderr)
            return done[-1]
    return path


def load_model_folder(path: str | Path):
    """The `Decoder` of a Hugging Face export (config.json) or a dptrain checkpoint (anything else:
    `load_model` names what is wrong with it, and the latest checkpoint of a run folder)."""
    from dptrain.checkpoint import load_model
    from dptrain.errors import UserError
    from dptrain.export import from_hf

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path} is not a folder: give a dptrain checkpoint or a Hugging Face export")
    return from_hf(path) if (path / "config.json").is_file() else load_model(path)


def torch_device(name: str | None):
    """`name` as a torch device (default: cuda when there is one); UserError for an unusable one."""
    import torch

    from dptrain.errors import UserError

    name = name or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as err:
        raise UserError(f"device {name!r} is not usable here ({str(err).splitlines()[0]})") from None
    return device


def tokenizer_file(model_dir: str | Path, given: str | None) -> Path:
    """The tokenizer to use: `given`, else the model folder's tokenizer.model."""
    from dptrain.errors import UserError
    from dptrain.export import TOKENIZER_FILE

    if given:
        return Path(given)  # load_tokenizer names a missing or unreadable file
    path = Path(model_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise UserError(f"{model_dir} has no {TOKENIZER_FILE}: pass --tokenizer FILE.model")
    return path


def load_tokenizer_for(model, path: Path):
    """The SentencePiece processor at `path`, refused when its pieces overflow the model's vocabulary."""
    from dptrain.data.tokenizer import load_tokenizer
    from dptrain.errors import UserError

    sp = load_tokenizer(path)
    if sp.get_piece_size() > model.cfg.vocab_size:
        raise UserError(f"tokenizer {path} has {sp.get_piece_size()} pieces, more than the model's "
                        f"vocab_size {model.cfg.vocab_size}: it is not this model's tokenizer")
    return sp


def new_token_count(requested: int | None, prompt_tokens: int, context: int) -> int:
    """How many tokens to generate: the request, checked against the context left after the prompt."""
    from dptrain.errors import UserError

    room = context - prompt_tokens
    if room < 1:
        raise UserError(f"the prompt is {prompt_tokens} tokens with BOS; the model's context is "
                        f"{context}, so no token fits after it: shorten the prompt")
    if requested is None:
        return min(DEFAULT_TOKENS, room)
    if not 1 <= requested <= room:
        raise UserError(f"--tokens must be in [1, {room}] (the model's context {context} minus the "
                        f"prompt's {prompt_tokens} tokens), got {requested}")
    return requested


def run(args) -> int:
    import torch

    from dptrain.errors import UserError
    from dptrain.generate import greedy_generate, sample_generate

    if not (args.temperature >= 0 and args.temperature != float("inf")):
        raise UserError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    args.model = model_folder(args.model)
    model = load_model_folder(args.model).to(torch_device(args.device))
    sp = load_tokenizer_for(model, tokenizer_file(args.model, args.tokenizer))
    prefix = torch.tensor([[sp.bos_id(), *sp.encode(args.prompt)]], dtype=torch.long)
    count = new_token_count(args.tokens, prefix.shape[1], model.cfg.max_seq_len)
    eos = sp.eos_id() if sp.eos_id() >= 0 else None
    if args.temperature == 0:
        new = greedy_generate(model, prefix, count, eos_id=eos)
    else:
        new = sample_generate(model, prefix, count, args.temperature, args.seed, eos_id=eos)
    ids = new[0].tolist()
    if eos is not None and eos in ids:  # a finished row repeats EOS to the end
        ids = ids[:ids.index(eos)]
    print(args.prompt + sp.decode(ids))
    return 0
