"""`dptrain cost`: counts on fake tensors equal counts on real ones, and match independent formulas."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from dptrain.cli import main
from dptrain.dp.benchmark import build_methods
from dptrain.dp.cost import StepCounter, count_step, opacus_ghost_flops
from dptrain.model import Decoder, DecoderConfig

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "model" / "tiny.yaml")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", ["nonprivate", "dptrain"])
def test_fake_counts_equal_real_counts(method, dtype):
    cfg = DecoderConfig.from_yaml(TINY)
    fake = count_step(cfg, method, 3, 16, dtype, fake=True)
    real = count_step(cfg, method, 3, 16, dtype, fake=False)
    assert dict(fake.flops) == dict(real.flops)
    assert fake.total_flops > 0
    if dtype == "float32":  # in bf16 the CPU upcasts what an accelerator multiplies as bf16
        # A few bytes apart: the engine's clipping counters exist only on real tensors.
        assert abs(fake.peak_bytes - real.peak_bytes) <= 64
        assert fake.peak_phase == real.peak_phase


def test_nonprivate_flops_match_the_textbook_count():
    """6 N per token for the matmuls, plus attention: QK^T and AV forward (4 B H T^2 Dh), and a
    backward that recomputes the scores (10 B H T^2 Dh), in every layer. The chunked head does
    its backward (4 V d per token) inside the forward."""
    cfg = DecoderConfig.from_yaml(TINY)
    b, t = 3, 16
    per_layer = cfg.hidden_size * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) \
        + 3 * cfg.hidden_size * cfg.intermediate_size
    matmul_params = cfg.num_layers * per_layer + cfg.vocab_size * cfg.hidden_size
    attention = 14 * b * cfg.num_layers * cfg.num_heads * t * t * cfg.head_dim
    counts = count_step(cfg, "nonprivate", b, t)
    assert counts.total_flops == 6 * matmul_params * b * t + attention
    assert count_step(cfg, "logits", b, t).total_flops == counts.total_flops  # whole logits: same matmuls
    head_backward = 4 * cfg.vocab_size * cfg.hidden_size * b * t
    assert counts.flops["forward"] == 2 * matmul_params * b * t + attention * 4 // 14 + head_backward


def test_opacus_formula_matches_a_counted_opacus_step():
    cfg = DecoderConfig.from_yaml(TINY)
    b, t = 2, 16
    torch.manual_seed(0)
    model = Decoder(cfg)
    inputs = torch.randint(0, cfg.vocab_size, (b, t))
    targets = torch.randint(0, cfg.vocab_size, (b, t))
    args = argparse.Namespace(methods="opacus-ghost", max_grad_norm=1.0, dtype="float32")
    methods, _ = build_methods(model, inputs, targets, args, torch.device("cpu"))
    methods["opacus-ghost"]()  # warm-up: lazily created state
    with StepCounter() as counter:
        methods["opacus-ghost"]()
    formula = sum(opacus_ghost_flops(cfg, b, t, count_step(cfg, "nonprivate", b, t)).values())
    assert formula == pytest.approx(counter.counts.total_flops, rel=1e-3)


def test_cost_cli_json_and_errors(capsys):
    assert main(["cost", TINY, "--seq-len", "32", "--micro-batch", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("nonprivate", "dptrain"):
        assert out["flops"][key] > 0 and out["peak_bytes"][key] > 0
        assert out["largest_micro_batch"][key] > 0
    assert out["flops"]["opacus_ghost"] > out["flops"]["dptrain"] > out["flops"]["nonprivate"]
    assert main(["cost", TINY, "--seq-len", "32", "--micro-batch", "2"]) == 0
    text = capsys.readouterr().out
    assert "dptrain" in text and "opacus_ghost" in text and "norms" in text
    assert main(["cost", TINY, "--seq-len", "100000"]) == 2
    assert "max_seq_len" in capsys.readouterr().err
