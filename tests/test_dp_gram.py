"""Only the Gram work that is needed: one block triangle of each symmetric Gram matrix, inputs'
Gram matrices shared, ghost norm or instantiation chosen by flops."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from dptrain.dp import DPEngine, layers
from dptrain.dp.cost import StepCounter, count_step
from dptrain.dp.reference import naive_clipped_grad_sum, unique_trainable
from dptrain.model import DecoderConfig
from test_dp_engine import VARIANTS, make_batch, make_model, rel

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model"


@pytest.mark.parametrize("variant", ["tied-mqa", "untied-gqa"])
def test_block_triangles_match_naive(monkeypatch, variant):
    monkeypatch.setattr(layers, "GRAM_BLOCK", 5)  # 12 tokens: blocks of 5, 5 and 2
    model = make_model(torch.float64, **VARIANTS[variant])
    inputs, targets, weights = make_batch()
    ref_norms, ref = naive_clipped_grad_sum(model, inputs, targets, 0.5, weights)
    norms = DPEngine(model, 0.5, norm_method="ghost").clipped_grad_sum(inputs, targets, weights)
    assert rel(norms, ref_norms) < 1e-10
    for p, r in zip(unique_trainable(model), ref):
        assert rel(p.grad, r) < 1e-10


def _norm_flops(groups, ghost: bool) -> int:
    prec = layers.Precision(torch.float32, torch.float32)
    cache = layers.GramCache()
    with StepCounter() as counter:
        for factors in groups:
            if ghost:
                layers.ghost_sq_norms(factors, prec, cache)
            else:
                layers.instantiated_sq_norms(factors, prec)
    return counter.counts.total_flops


@pytest.mark.parametrize("tokens, d, widths", [
    (1024, 1152, [1024, 256, 256]),   # q/k/v of the 1B config: ghost, sharing the inputs' Gram
    (1024, 1024, [1152]),             # its o_proj: instantiate
    (1024, 6912, [1152]),             # its down_proj: ghost
    (256, 64, [64, 64]),              # narrow layers, long sequences: instantiate
])
def test_choice_takes_the_fewer_counted_flops(tokens, d, widths):
    with FakeTensorMode():
        inputs = torch.empty(1, tokens, d)
        groups = [[layers.Factor(torch.empty(1, tokens, p), inputs, False)] for p in widths]
        chosen = layers.choose_ghost(groups)
        ghost, inst = _norm_flops(groups, True), _norm_flops(groups, False)
    assert len(set(chosen)) == 1  # layers sharing an input are decided together
    assert chosen[0] == (ghost < inst)


@pytest.mark.slow
def test_1b_targets_counted():
    """VaultGemma 1B, T = 1024, bf16: DP / non-private flops <= 1.20, and the DP step's memory per
    sequence at most 60% of a non-private step that forms the whole logits."""
    cfg = DecoderConfig.from_yaml(CONFIGS / "vaultgemma-1b.yaml")
    dp = [count_step(cfg, "dptrain", b, 1024, "bfloat16") for b in (1, 2)]
    logits = [count_step(cfg, "logits", b, 1024, "bfloat16") for b in (1, 2)]
    # The whole-logits step does the same matmuls as the chunked one (test_dp_cost.py counts both).
    assert dp[0].total_flops / logits[0].total_flops <= 1.20
    per_seq = dp[1].peak_bytes - dp[0].peak_bytes
    assert per_seq <= 0.6 * (logits[1].peak_bytes - logits[0].peak_bytes)
