import pytest
import torch

from dptrain import configio
from dptrain.errors import UserError
from dptrain.model import Decoder, DecoderConfig, parameter_counts


def tiny(**kw) -> DecoderConfig:
    base = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                num_kv_heads=1, head_dim=8, max_seq_len=16, query_pre_attn_scalar=8.0)
    base.update(kw)
    return DecoderConfig(**base)


def test_parameter_count_matches_the_module():
    for tie in (True, False):
        cfg = tiny(tie_embeddings=tie, num_kv_heads=2)
        model = Decoder(cfg)
        assert sum(p.numel() for p in model.parameters()) == parameter_counts(cfg)["total"]


def test_vaultgemma_1b_is_about_one_billion():
    cfg = DecoderConfig.from_yaml("configs/model/vaultgemma-1b.yaml")
    assert 0.95e9 < parameter_counts(cfg)["total"] < 1.05e9


def test_tied_head_shares_the_embedding():
    model = Decoder(tiny())
    assert model.lm_head.weight is model.embed_tokens.weight
    assert not any(True for _ in model.buffers())


def test_causal_no_future_leak_and_rows_independent():
    torch.manual_seed(0)
    model = Decoder(tiny(attn_logit_softcapping=20.0)).eval()
    x = torch.randint(0, 61, (3, 12))
    y = model(x)
    x2 = x.clone()
    x2[:, 8:] = torch.randint(0, 61, (3, 4))
    x2[1] = torch.randint(0, 61, (12,))
    y2 = model(x2)
    torch.testing.assert_close(y[:, :8][[0, 2]], y2[:, :8][[0, 2]])
    torch.testing.assert_close(y[0], model(x[:1])[0])


@pytest.mark.parametrize("bad, field", [
    (dict(num_heads=5), "num_heads"), (dict(num_kv_heads=3), "num_kv_heads"), (dict(hidden_size=0), "hidden_size")])
def test_bad_shapes_name_the_field(bad, field):
    with pytest.raises(UserError, match=field):
        configio.from_dict(DecoderConfig, {**configio.to_dict(tiny()), **bad})


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("hidden_size: 32\nnum_layerz: 3\n")
    with pytest.raises(UserError, match="num_layerz"):
        DecoderConfig.from_yaml(path)


def test_cli_model_info_and_bad_config_exit_code(tmp_path, capsys):
    from dptrain.cli import main
    assert main(["model", "info", "configs/model/vaultgemma-1b.yaml"]) == 0
    assert "992,734,848" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("num_heads: 4\nnum_kv_heads: 3\n")
    assert main(["model", "info", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "num_kv_heads" in err and len(err.strip().splitlines()) == 1


def test_compiled_mixers_give_the_same_per_example_norms_and_sums():
    from dptrain.dp import DPEngine

    torch.manual_seed(0)
    model = Decoder(tiny(num_kv_heads=2))
    x, y = torch.randint(0, 61, (3, 12)), torch.randint(0, 61, (3, 12))
    engine = DPEngine(model, max_grad_norm=0.1)
    eager_norms = engine.clipped_grad_sum(x, y)
    eager = [p.grad.clone() for p in engine.parameters]
    engine.zero_grad()
    model.compile_mixers()
    torch.testing.assert_close(engine.clipped_grad_sum(x, y), eager_norms, rtol=1e-5, atol=0)
    for param, ref in zip(engine.parameters, eager):
        torch.testing.assert_close(param.grad, ref, rtol=1e-5, atol=1e-7)
