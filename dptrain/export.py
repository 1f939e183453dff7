"""Hugging Face export and import: our `Decoder` <-> a `VaultGemmaForCausalLM` folder.

The module names of `Decoder` already follow Hugging Face's, so the weights only gain or lose the
`model.` prefix; Gemma's norm convention (gain 1 + w) is shared too, so no tensor is transformed.
`config.json` is written with every field explicit because `VaultGemmaConfig`'s defaults describe
a different model (Gemma-2-2B sizes, sliding windows, soft-capping on).

Export writes into a temporary folder, reloads it with transformers and compares logits before the
folder is renamed into place, so a folder that exists is one that was checked.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from dptrain.checkpoint import WEIGHTS_FILE, atomic_dir, load_model, write_model
from dptrain.errors import UserError
from dptrain.model import Decoder, DecoderConfig
from dptrain.privacy.lineage import copy_spent, mark_public, read_spent, write_spent

PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
HF_MODEL_TYPE = "vaultgemma"
HF_ACTIVATION = "gelu_pytorch_tanh"
HF_WEIGHTS_INDEX = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.model"  # SentencePiece model, in a checkpoint and in an export
# Our config fields whose Hugging Face names differ, for error messages about a config.json.
HF_NAMES = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
            "num_kv_heads": "num_key_value_heads", "max_seq_len": "max_position_embeddings"}
DEFAULT_SPECIAL_IDS = {"pad_token_id": PAD_ID, "eos_token_id": EOS_ID, "bos_token_id": BOS_ID}
# An imported model's own special-token ids, kept in its checkpoint so a re-export writes them back.
SPECIAL_IDS_FILE = "special_tokens.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Text the tokenizer check encodes with both libraries: spaces, digits, accents, newlines.
TOKENIZER_PROBE = "Hello  world!\nDifferential privacy, 2025: ε = 1.0 — café  ok\t done "


class ExportVerificationError(RuntimeError):
    """The exported folder does not reproduce the model; a bug, not a user mistake."""


# ----------------------------------------------------------------------------------- export


def hf_config_dict(cfg: DecoderConfig, dtype: torch.dtype = torch.float32,
                   special_ids: dict | None = None) -> dict:
    """`config.json` for `cfg`, every `VaultGemmaConfig` field set (its defaults are not ours).

    `special_ids` (pad/eos/bos_token_id) default to dptrain's tokenizer's.
    """
    if not float(cfg.query_pre_attn_scalar).is_integer():
        raise UserError(f"query_pre_attn_scalar {cfg.query_pre_attn_scalar} is not an integer, "
                        "which Hugging Face's VaultGemmaConfig requires")
    return {
        "architectures": ["VaultGemmaForCausalLM"],
        "model_type": HF_MODEL_TYPE,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_activation": HF_ACTIVATION,
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.initializer_range,
        "rms_norm_eps": cfg.rms_norm_eps,
        "use_cache": True,
        **(special_ids or DEFAULT_SPECIAL_IDS),
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "query_pre_attn_scalar": int(cfg.query_pre_attn_scalar),
        # Unused (every layer is full attention) but transformers builds its mask regardless.
        "sliding_window": cfg.max_seq_len,
        "layer_types": ["full_attention"] * cfg.num_layers,
        "final_logit_softcapping": cfg.final_logit_softcapping,
        "attn_logit_softcapping": cfg.attn_logit_softcapping,
        "dtype": str(dtype).removeprefix("torch."),
    }


def hf_state_dict(model: Decoder, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Our weights under Hugging Face names; a tied head is stored once, as the embedding."""
    return {(name if name == "lm_head.weight" else f"model.{name}"): t.detach().to("cpu", dtype).contiguous()
            for name, t in model.unique_state_dict().items()}


def _write_json(obj: dict, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def check_tokenizer_exports(sp_model: str | Path) -> None:
    """UserError unless `sp_model` becomes a Gemma tokenizer that encodes exactly as it does.

    Run before training (by `data prepare`), so an incompatible tokenizer is refused before any
    budget is spent on a model that could not be exported with it.
    """
    import tempfile

    with tempfile.TemporaryDirectory(prefix="dptrain-tokenizer-check-") as tmp:
        write_tokenizer(sp_model, Path(tmp))


def write_tokenizer(sp_model: str | Path, folder: Path, cfg: DecoderConfig | None = None) -> None:
    """Put a SentencePiece model into `folder` as a Gemma tokenizer `AutoTokenizer` can load.

    The `.model` is kept and `tokenizer.json` is converted from it once here, so loading needs
    neither sentencepiece nor a conversion. Encodings are checked against sentencepiece. Without
    `cfg` the tokenizer is checked on its own (no model's vocabulary or context length).
    """
    import sentencepiece as spm
    from transformers import AutoTokenizer

    sp_model = Path(sp_model)
    if not sp_model.is_file():
        raise UserError(f"tokenizer {sp_model} does not exist")
    try:
        sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    except (RuntimeError, OSError) as err:
        raise UserError(f"tokenizer {sp_model} is not a SentencePiece model ({err})") from None
    ids = {"pad": (sp.pad_id(), PAD_ID), "eos": (sp.eos_id(), EOS_ID),
           "bos": (sp.bos_id(), BOS_ID), "unk": (sp.unk_id(), UNK_ID)}
    for role, (got, want) in ids.items():
        if got != want:
            raise UserError(f"tokenizer {sp_model}: {role} id is {got}, the model expects {want} "
                            "(pad 0, eos 1, bos 2, unk 3)")
    if cfg is not None and sp.get_piece_size() > cfg.vocab_size:
        raise UserError(f"tokenizer {sp_model} has {sp.get_piece_size()} pieces, "
                        f"more than the model's vocab_size {cfg.vocab_size}")
    shutil.copyfile(sp_model, folder / TOKENIZER_FILE)
    _write_json({
        "tokenizer_class": "GemmaTokenizer",
        "pad_token": sp.id_to_piece(PAD_ID),
        "eos_token": sp.id_to_piece(EOS_ID),
        "bos_token": sp.id_to_piece(BOS_ID),
        "unk_token": sp.id_to_piece(UNK_ID),
        "mask_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        **({"model_max_length": cfg.max_seq_len} if cfg is not None else {}),
    }, folder / "tokenizer_config.json")
    AutoTokenizer.from_pretrained(folder).save_pretrained(folder)
    # Drop what describes this machine (the temporary folder) rather than the tokenizer.
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    for key in ("vocab_file", "is_local", "local_files_only"):
        config.pop(key, None)
    _write_json(config, config_file)
    # verbose=False: a probe longer than a small model's context is fine here, it is never run.
    ours = AutoTokenizer.from_pretrained(folder)(TOKENIZER_PROBE, add_special_tokens=False,
                                                 verbose=False)["input_ids"]
    if ours != sp.encode(TOKENIZER_PROBE):
        raise UserError(f"tokenizer {sp_model} does not encode like a Gemma tokenizer, so a model "
                        "trained with it could not be exported; train it with `dptrain tokenizer "
                        "train` (or as Gemma's: model_type=bpe, add_dummy_prefix=false, "
                        "remove_extra_whitespaces=false, normalization_rule_name=identity)")


def to_hf(model: Decoder, out_dir: str | Path, tokenizer_path: str | Path | None = None,
          dtype: str | torch.dtype | None = None, verify: bool = True,
          special_ids: dict | None = None, spent: tuple | None = None) -> Path:
    """Write `model` as a Hugging Face VaultGemma folder; with `verify`, check it reloads exactly.

    `special_ids`: the pad/eos/bos token ids to declare, for a model imported with ids of its
    own; its tokenizer is then copied as it came, not converted (conversion assumes Gemma's ids).
    `spent`: (ledger, lineage) of the private training behind the weights, written beside them
    (`dptrain.privacy.lineage`) so that training further from the export continues the ledger.
    """
    dtype = _dtype(dtype)
    out_dir = Path(out_dir)
    special_ids = special_ids or DEFAULT_SPECIAL_IDS
    config = hf_config_dict(model.cfg, dtype, special_ids)
    with atomic_dir(out_dir) as tmp:
        _write_json(config, tmp / "config.json")
        _write_json(special_ids, tmp / "generation_config.json")
        save_file(hf_state_dict(model, dtype), tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        if spent is not None:
            write_spent(tmp, *spent)
        if tokenizer_path is not None and special_ids == DEFAULT_SPECIAL_IDS:
            write_tokenizer(tokenizer_path, tmp, model.cfg)
        elif tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / TOKENIZER_FILE)
        if verify:
            verify_export(model, tmp, dtype)
    return out_dir


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    raise UserError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")


def random_inputs(vocab_size: int, max_seq_len: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (2, min(16, max_seq_len)), generator=gen)


@torch.no_grad()
def verify_export(model: Decoder, folder: Path, dtype: torch.dtype = torch.float32) -> float:
    """Reload `folder` with transformers (eager attention, float32) and compare logits.

    The reference is a fresh copy of `model` on the CPU in float32 with its weights rounded as they
    were stored, so a bfloat16 export is judged on the export, not on the rounding.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per tensor file, for a check that takes seconds
    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    reference = Decoder(model.cfg)
    reference.load_unique_state_dict({name: t.detach().to("cpu", dtype).float()
                                      for name, t in model.unique_state_dict().items()})
    inputs = random_inputs(model.cfg.vocab_size, model.cfg.max_seq_len)
    expected = reference.eval()(inputs)
    diff = (expected - hf_model.eval()(inputs).logits).abs().max().item()
    tolerance = 1e-4 * max(1.0, expected.abs().max().item())
    if not diff <= tolerance:
        raise ExportVerificationError(f"exported model's logits differ from the original by {diff:.3g} "
                                      f"(tolerance {tolerance:.3g})")
    return diff


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, tokenizer_path: str | Path | None = None,
                      dtype: str | torch.dtype | None = None, verify: bool = True) -> Path:
    """Export a dptrain checkpoint folder; its `tokenizer.model`, if any, is used by default."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise UserError(f"checkpoint {checkpoint} is not a folder")
    model = load_model(checkpoint)
    special_ids = read_special_ids(checkpoint)
    if tokenizer_path is None and (checkpoint / TOKENIZER_FILE).is_file():
        tokenizer_path = checkpoint / TOKENIZER_FILE
    return to_hf(model, out_dir, tokenizer_path, dtype, verify, special_ids, read_spent(checkpoint))


def read_special_ids(checkpoint: Path) -> dict | None:
    """The special-token ids an imported checkpoint recorded, or None for dptrain's own."""
    file = Path(checkpoint) / SPECIAL_IDS_FILE
    if not file.is_file():
        return None
    try:
        ids = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{file} is not valid JSON ({err})") from None
    if not isinstance(ids, dict) or set(ids) != set(DEFAULT_SPECIAL_IDS):
        raise UserError(f"{file} must hold exactly {', '.join(DEFAULT_SPECIAL_IDS)}")
    return ids


# ----------------------------------------------------------------------------------- import


def _read_hf_config(path: Path):
    """Parse `config.json` with transformers' own VaultGemmaConfig (legacy keys and defaults)."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import VaultGemmaConfig

    file = path / "config.json"
    if not file.is_file():
        raise UserError(f"{path} is not a Hugging Face model folder (no config.json)")
    try:
        raw = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{file} is not valid JSON ({err})") from None
    if not isinstance(raw, dict) or raw.get("model_type") != HF_MODEL_TYPE:
        got = raw.get("model_type") if isinstance(raw, dict) else None
        raise UserError(f"{file}: model_type is {got!r}, only {HF_MODEL_TYPE!r} can be imported")
    try:
        return VaultGemmaConfig.from_pretrained(path)
    except (StrictDataclassError, ValueError, TypeError) as err:
        raise UserError(f"{file} is not a valid VaultGemma config ({' '.join(str(err).split())})") from None


def config_from_hf(hf) -> DecoderConfig:
    """Map a `VaultGemmaConfig` onto `DecoderConfig`, refusing what our decoder cannot compute."""
    where = "config.json"
    rope = hf.rope_parameters or {}
    if rope.get("rope_type", "default") != "default":
        raise UserError(f"{where}: rope_parameters.rope_type {rope.get('rope_type')!r} is not supported "
                        "(only 'default')")
    if hf.hidden_activation != HF_ACTIVATION:
        raise UserError(f"{where}: hidden_activation {hf.hidden_activation!r} is not supported "
                        f"(only {HF_ACTIVATION!r})")
    if hf.attention_bias:
        raise UserError(f"{where}: attention_bias true is not supported (projections have no bias)")
    for i, kind in enumerate(hf.layer_types):
        # A window at least as long as any sequence never masks anything: it is full attention.
        window_is_full = kind == "sliding_attention" and (hf.sliding_window or 0) >= hf.max_position_embeddings
        if kind != "full_attention" and not window_is_full:
            raise UserError(f"{where}: layer_types[{i}] is {kind!r} with sliding_window {hf.sliding_window}; "
                            "only full attention is supported")
    try:
        return DecoderConfig(
            vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers, num_heads=hf.num_attention_heads,
            num_kv_heads=hf.num_key_value_heads, head_dim=hf.head_dim,
            max_seq_len=hf.max_position_embeddings, rope_theta=float(rope.get("rope_theta", 10000.0)),
            rms_norm_eps=hf.rms_norm_eps, query_pre_attn_scalar=float(hf.query_pre_attn_scalar),
            attn_logit_softcapping=hf.attn_logit_softcapping,
            final_logit_softcapping=hf.final_logit_softcapping,
            tie_embeddings=hf.tie_word_embeddings, initializer_range=hf.initializer_range)
    except ValueError as err:  # say it with the names the user sees in config.json
        message = re.sub(r"\b\w+\b", lambda m: HF_NAMES.get(m.group(), m.group()), str(err))
        raise UserError(f"{where}: {message}") from None


def _weight_files(path: Path) -> list[Path]:
    index = path / HF_WEIGHTS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise UserError(f"{index} is not a safetensors index ({err})") from None
        files = [path / name for name in sorted(set(weight_map.values()))]
    else:
        files = [path / WEIGHTS_FILE]
    for file in files:
        if not file.is_file():
            raise UserError(f"{path} lacks weight file {file.name}")
    return files


def read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a (possibly sharded) safetensors model, by name, in float32."""
    state: dict[str, torch.Tensor] = {}
    for file in _weight_files(path):
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    state[name] = f.get_tensor(name).float()
        except (SafetensorError, OSError, ValueError) as err:
            raise UserError(f"{file} is corrupt or unreadable ({err})") from None
    return state


def from_hf(path: str | Path) -> Decoder:
    """Load a Hugging Face VaultGemma folder into our `Decoder` (no Hugging Face model is built)."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path} is not a folder")
    cfg = config_from_hf(_read_hf_config(path))
    state = {}
    for name, tensor in read_hf_weights(path).items():
        if name == "lm_head.weight":
            if not cfg.tie_embeddings:  # a tied checkpoint may still carry the alias: ignore it
                state[name] = tensor
        elif name.startswith("model."):
            state[name.removeprefix("model.")] = tensor
        else:
            raise UserError(f"{path}: tensor '{name}' is not part of a VaultGemmaForCausalLM")
    model = Decoder(cfg)
    model.load_unique_state_dict(state)
    return model


def special_ids_of(hf) -> dict:
    """The pad/eos/bos token ids a Hugging Face config declares (an id may be a list or None)."""
    return {name: getattr(hf, name, None) for name in DEFAULT_SPECIAL_IDS}


def import_checkpoint(hf_dir: str | Path, checkpoint: str | Path) -> Path:
    """Write a dptrain checkpoint from a Hugging Face folder, keeping its `tokenizer.model`.

    Special-token ids do not change the logits, so any are accepted; ids other than dptrain's are
    recorded in the checkpoint and written back on export.
    """
    hf_dir = Path(hf_dir)
    model = from_hf(hf_dir)
    special_ids = special_ids_of(_read_hf_config(hf_dir))
    with atomic_dir(checkpoint) as tmp:
        write_model(model, tmp)
        if special_ids != DEFAULT_SPECIAL_IDS:
            _write_json(special_ids, tmp / SPECIAL_IDS_FILE)
        if not copy_spent(hf_dir, tmp):  # no record of private training behind these weights
            mark_public(tmp, str(hf_dir))
        if (hf_dir / TOKENIZER_FILE).is_file():
            shutil.copyfile(hf_dir / TOKENIZER_FILE, tmp / TOKENIZER_FILE)
    return Path(checkpoint)

