"""Hugging Face export/import, checked against transformers' own VaultGemmaForCausalLM."""
from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file, save_file

from dptrain.checkpoint import load_model, save_model
from dptrain.cli import main
from dptrain.errors import UserError
from dptrain.export import (ExportVerificationError, config_from_hf, from_hf, hf_config_dict, to_hf,
                            verify_export)
from dptrain.model import Decoder, DecoderConfig

transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

VOCAB = 300
ATOL = 1e-5


def tiny_config(num_kv_heads: int = 1, softcap: bool = False, tied: bool = True) -> DecoderConfig:
    # No field equals a default or another field (heads x head_dim != hidden, scalar != head_dim),
    # so a field dropped or swapped on the way shows up in the logits.
    return DecoderConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                         num_kv_heads=num_kv_heads, head_dim=12, max_seq_len=24, rope_theta=500.0,
                         rms_norm_eps=1e-5, query_pre_attn_scalar=20.0,
                         attn_logit_softcapping=5.0 if softcap else None,
                         final_logit_softcapping=3.0 if softcap else None, tie_embeddings=tied)


@torch.no_grad()
def randomize(module: torch.nn.Module, seed: int) -> None:
    """Weights far from initialisation, norm gains included, so that every tensor matters."""
    gen = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def random_ids(seed: int = 1, length: int = 20) -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, length), generator=torch.Generator().manual_seed(seed))


def load_hf(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                              attn_implementation="eager")
    return model.eval()


def max_diff(ours: Decoder, hf_model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return (ours(ids) - hf_model(ids).logits).abs().max().item()


ATTENTION = {"multi-query": 1, "grouped-query": 2, "multi-head": 4}


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("softcap", [False, True], ids=["nocap", "softcap"])
@pytest.mark.parametrize("attention", list(ATTENTION))
def test_round_trip_dptrain_hf_dptrain(tmp_path, attention, softcap, tied):
    model = Decoder(tiny_config(ATTENTION[attention], softcap, tied)).eval()
    randomize(model, seed=len(attention) + 2 * softcap + tied)
    out = to_hf(model, tmp_path / "hf", verify=False)  # checked here, to a tighter tolerance

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "vaultgemma"
    assert config["layer_types"] == ["full_attention", "full_attention"]
    assert config["num_key_value_heads"] == ATTENTION[attention]
    assert config["attn_logit_softcapping"] == (5.0 if softcap else None)
    weights = load_file(out / "model.safetensors")
    assert ("lm_head.weight" in weights) == (not tied)
    assert all(name == "lm_head.weight" or name.startswith("model.") for name in weights)

    hf_model = load_hf(out)
    ids = random_ids()
    with torch.no_grad():
        assert model(ids).std() > 0.1  # logits that actually vary, so agreement means something
    assert max_diff(model, hf_model, ids) < ATOL

    back = from_hf(out)
    assert back.cfg == model.cfg
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    with torch.no_grad():
        assert (back(ids) - model(ids)).abs().max().item() < ATOL

    generated = hf_model.generate(ids[:1, :5], max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 9)


@pytest.mark.parametrize("tied,sharded", [(True, False), (False, True)], ids=["tied", "untied-sharded"])
def test_hf_model_loads_into_decoder(tmp_path, tied, sharded):
    cfg = tiny_config(num_kv_heads=2, softcap=not tied, tied=tied)
    hf_config = transformers.VaultGemmaConfig(**hf_config_dict(cfg))
    hf_model = transformers.VaultGemmaForCausalLM(hf_config).eval()
    randomize(hf_model, seed=7)
    hf_model.save_pretrained(tmp_path / "hf", max_shard_size="20KB" if sharded else "1GB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists() == sharded

    ours = from_hf(tmp_path / "hf").eval()
    assert ours.cfg == cfg
    hf_model = load_hf(tmp_path / "hf")  # reloaded, as eager attention in float32
    assert max_diff(ours, hf_model, random_ids(seed=3)) < ATOL


def test_bfloat16_export(tmp_path):
    model = Decoder(tiny_config(softcap=True, tied=False))
    randomize(model, seed=11)
    out = to_hf(model, tmp_path / "hf", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in load_file(out / "model.safetensors").values())
    back = from_hf(out)
    rounded = {k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()}
    assert all(torch.equal(back.state_dict()[k], v) for k, v in rounded.items())


def test_verification_detects_a_wrong_export(tmp_path):
    model = Decoder(tiny_config())
    randomize(model, seed=5)
    out = to_hf(model, tmp_path / "hf", verify=False)
    with torch.no_grad():
        model.layers[1].mlp.down_proj.weight.mul_(1.01)
    with pytest.raises(ExportVerificationError):
        verify_export(model, out)


def train_tokenizer(folder, **overrides):
    """A tiny Gemma-style SentencePiece model: BPE, byte fallback, no dummy prefix."""
    rng = random.Random(0)
    words = "privacy noise clip gradient token batch secret model data train ε café 2025".split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(400)]
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(lines))
    options = dict(input=str(corpus), model_prefix=str(folder / "sp"), vocab_size=VOCAB, model_type="bpe",
                   byte_fallback=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3, add_dummy_prefix=False,
                   remove_extra_whitespaces=False, normalization_rule_name="identity", minloglevel=2)
    spm.SentencePieceTrainer.train(**{**options, **overrides})
    return folder / "sp.model"


def test_export_with_tokenizer_from_checkpoint(tmp_path, capsys):
    model = Decoder(tiny_config(num_kv_heads=2))
    randomize(model, seed=3)
    checkpoint = save_model(model, tmp_path / "ckpt")
    sp_path = train_tokenizer(tmp_path)
    (checkpoint / "tokenizer.model").write_bytes(sp_path.read_bytes())

    assert main(["export", str(checkpoint), str(tmp_path / "hf")]) == 0
    assert "logits verified" in capsys.readouterr().out
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    sp = spm.SentencePieceProcessor(model_file=str(sp_path))
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id,
            tokenizer.unk_token_id) == (0, 1, 2, 3)
    assert tokenizer.model_max_length == 24
    for text in ["secret gradient noise", "  two  spaces\nand a newline", "unseen: ☃ 42 café", ""]:
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == sp.encode(text)
        assert tokenizer(text)["input_ids"] == [2] + sp.encode(text)

    hf_model = load_hf(tmp_path / "hf")
    prompt = tokenizer("privacy noise", return_tensors="pt")
    generated = hf_model.generate(**prompt, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 3
    assert isinstance(tokenizer.decode(generated[0]), str)

    assert main(["import", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    assert (tmp_path / "back" / "tokenizer.model").read_bytes() == sp_path.read_bytes()
    back = load_model(tmp_path / "back")
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())


def test_tokenizer_with_other_special_ids_is_refused(tmp_path):
    sp_path = train_tokenizer(tmp_path, pad_id=-1, unk_id=0, bos_id=1, eos_id=2)
    with pytest.raises(UserError, match="pad id is -1"):
        to_hf(Decoder(tiny_config()), tmp_path / "hf", tokenizer_path=sp_path)
    assert not (tmp_path / "hf").exists()


def test_tokenizer_that_gemma_cannot_reproduce_is_refused(tmp_path):
    sp_path = train_tokenizer(tmp_path, model_type="unigram", add_dummy_prefix=True, vocab_size=295)
    with pytest.raises(UserError, match="add_dummy_prefix=false"):
        to_hf(Decoder(tiny_config()), tmp_path / "hf", tokenizer_path=sp_path, verify=False)
    with pytest.raises(UserError, match="does not exist"):
        to_hf(Decoder(tiny_config()), tmp_path / "hf", tokenizer_path=tmp_path / "none.model")
    assert not (tmp_path / "hf").exists()


def test_import_refuses_what_the_decoder_cannot_compute(tmp_path):
    folder = tmp_path / "hf"
    to_hf(Decoder(tiny_config()), folder, verify=False)
    original = json.loads((folder / "config.json").read_text())
    cases = {
        "layer_types[0]": {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 4},
        "attention_bias": {"attention_bias": True},
        "hidden_activation": {"hidden_activation": "relu"},
        "model_type": {"model_type": "gemma2"},
        "num_hidden_layers": {"num_hidden_layers": "two"},
        "attention heads": {"num_attention_heads": 5},
        "num_key_value_heads 3": {"num_key_value_heads": 3},
    }
    for field, change in cases.items():
        (folder / "config.json").write_text(json.dumps({**original, **change}))
        with pytest.raises(UserError, match=field.replace("[", r"\[").replace("]", r"\]")):
            from_hf(folder)
    # A window longer than any sequence is full attention, so it loads.
    (folder / "config.json").write_text(json.dumps(
        {**original, "layer_types": ["sliding_attention"] * 2, "sliding_window": 24}))
    assert from_hf(folder).cfg == tiny_config()


def test_import_keeps_other_special_ids(tmp_path, capsys):
    # transformers' VaultGemma test models declare bos 1, eos 2: the logits do not depend on it.
    model = Decoder(tiny_config())
    randomize(model, seed=9)
    hf = to_hf(model, tmp_path / "hf", verify=False)
    theirs = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": [2, 5]}
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, **theirs}))

    assert main(["import", str(hf), str(tmp_path / "ckpt")]) == 0
    assert json.loads((tmp_path / "ckpt" / "special_tokens.json").read_text()) == theirs
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "again")]) == 0
    assert "logits verified" in capsys.readouterr().out
    exported = json.loads((tmp_path / "again" / "config.json").read_text())
    assert {k: exported[k] for k in theirs} == theirs
    assert json.loads((tmp_path / "again" / "generation_config.json").read_text()) == theirs
    again = load_hf(tmp_path / "again")
    assert max_diff(model.eval(), again, random_ids(seed=4)) < ATOL


def cli_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "error:" in err
    return err


def test_bad_inputs_exit_2_with_one_line(tmp_path, capsys):
    assert "not a folder" in cli_error(capsys, ["export", str(tmp_path / "missing"), str(tmp_path / "o")])
    assert "not a folder" in cli_error(capsys, ["import", str(tmp_path / "missing"), str(tmp_path / "o")])

    checkpoint = save_model(Decoder(tiny_config()), tmp_path / "ckpt")
    weights = checkpoint / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:200])
    assert "corrupt" in cli_error(capsys, ["export", str(checkpoint), str(tmp_path / "o")])

    weights.write_bytes(good)
    state = load_file(weights)
    state["norm.weight"] = torch.zeros(7)
    save_file(state, weights)
    assert "norm.weight" in cli_error(capsys, ["export", str(checkpoint), str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()

    hf = to_hf(Decoder(tiny_config()), tmp_path / "hf", verify=False)
    (hf / "model.safetensors").write_bytes(b"not safetensors")
    assert "corrupt" in cli_error(capsys, ["import", str(hf), str(tmp_path / "o")])

    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    assert "model_type" in cli_error(capsys, ["import", str(hf), str(tmp_path / "o")])

    with pytest.raises(UserError, match="dtype"):
        to_hf(Decoder(tiny_config()), tmp_path / "o", dtype="float16")


@pytest.mark.parametrize("name", ["tiny", "small", "vaultgemma-1b", "vaultgemma-1b-released"])
def test_shipped_configs_map_both_ways(name):
    cfg = DecoderConfig.from_yaml(f"configs/model/{name}.yaml")
    hf = transformers.VaultGemmaConfig(**hf_config_dict(cfg))  # strict: rejects wrong types
    assert config_from_hf(hf) == cfg
    # As published for VaultGemma 1B: full attention everywhere, an unused sliding_window of 512.
    published = transformers.VaultGemmaConfig(**{**hf_config_dict(cfg), "sliding_window": 512})
    assert config_from_hf(published) == cfg


def test_released_config_is_the_published_model():
    # The released VaultGemma 1B: 4 KV heads and about 1.04B parameters, counted by transformers.
    from dptrain.model import parameter_counts

    cfg = DecoderConfig.from_yaml("configs/model/vaultgemma-1b-released.yaml")
    with torch.device("meta"):
        hf_model = transformers.VaultGemmaForCausalLM(transformers.VaultGemmaConfig(**hf_config_dict(cfg)))
    counted = sum(p.numel() for p in hf_model.parameters())
    assert cfg.num_kv_heads == 4 and parameter_counts(cfg)["total"] == counted
    assert 1.03e9 < counted < 1.05e9


def test_fractional_query_scalar_cannot_be_exported(tmp_path):
    cfg = tiny_config()
    cfg.query_pre_attn_scalar = 8.5
    with pytest.raises(UserError, match="query_pre_attn_scalar"):
        to_hf(Decoder(cfg), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


@pytest.mark.gpu
@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16])
def test_export_of_a_cuda_model(tmp_path, model_dtype):
    model = Decoder(tiny_config(num_kv_heads=2, softcap=True, tied=False))
    randomize(model, seed=13)
    model = model.to("cuda", model_dtype)
    out = to_hf(model, tmp_path / "hf", dtype="bfloat16")  # verified on the CPU
    back = from_hf(out)
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor.cpu().to(torch.bfloat16).float()), name


def test_a_run_folder_given_for_a_checkpoint_names_the_latest(tmp_path, capsys):
    for step in (5, 10):
        save_model(Decoder(tiny_config()), tmp_path / "run" / "checkpoints" / f"step-{step:08d}")
    for given in (tmp_path / "run", tmp_path / "run" / "checkpoints"):
        err = cli_error(capsys, ["export", str(given), str(tmp_path / "out")])
        assert err.endswith(f"the latest checkpoint in it is {tmp_path / 'run' / 'checkpoints' / 'step-00000010'}")
