"""The DP engine against the naive per-example loop (`dptrain.dp.reference`)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dptrain.dp import DPEngine, clipped_grad_sum
from dptrain.dp.reference import naive_clipped_grad_sum, per_example_grads, unique_trainable
from dptrain.errors import UserError
from dptrain.privacy.mechanism import Mechanism
from dptrain.model import Decoder, DecoderConfig

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}

VARIANTS = {
    "tied-mqa": dict(tie_embeddings=True, num_kv_heads=1),
    "untied-gqa": dict(tie_embeddings=False, num_kv_heads=2),
    "tied-mha-softcap": dict(tie_embeddings=True, num_kv_heads=4, attn_logit_softcapping=20.0,
                             final_logit_softcapping=10.0),
    "untied-mqa-softcap": dict(tie_embeddings=False, num_kv_heads=1, attn_logit_softcapping=5.0,
                               final_logit_softcapping=3.0),
}


def make_model(dtype=torch.float32, seed=0, **overrides) -> Decoder:
    cfg = dict(vocab_size=40, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=4,
               num_kv_heads=1, head_dim=8, max_seq_len=16, query_pre_attn_scalar=8.0)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = Decoder(DecoderConfig(**cfg)).to(dtype)
    with torch.no_grad():  # move norm gains off zero and grow weights so gradients are O(1)
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def make_batch(seed=1, batch=5, seq=12, vocab=40):
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randint(0, 6, (batch, seq), generator=g)   # few ids: repeated tokens
    targets = torch.randint(0, vocab, (batch, seq), generator=g)
    targets[1, :7] = -100           # some ignored positions
    targets[3] = -100               # an example with every position ignored
    weights = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5])   # example 2 is padding
    return inputs, targets, weights


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


@pytest.mark.parametrize("method", ["auto", "ghost", "instantiate"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_matches_naive_reference(dtype, variant, method):
    model = make_model(dtype, **VARIANTS[variant])
    inputs, targets, weights = make_batch()
    norms, _ = naive_clipped_grad_sum(model, inputs, targets, 1.0, weights)
    c = float(norms[[0, 1, 4]].min() + norms[[0, 1, 4]].max()) / 2  # clips some examples, not all
    ref_norms, ref_sums = naive_clipped_grad_sum(model, inputs, targets, c, weights)
    engine = DPEngine(model, c, norm_method=method)
    norms = engine.clipped_grad_sum(inputs, targets, weights)
    assert norms.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert rel(norms, ref_norms) < TOL[dtype]
    assert norms[3] == 0  # all positions ignored: zero gradient
    for p, ref in zip(unique_trainable(model), ref_sums):
        assert rel(p.grad, ref) < TOL[dtype]


def test_every_parameter_covered_once():
    for tie in (True, False):
        model = make_model(tie_embeddings=tie)
        engine = DPEngine(model, 1.0)
        assert {id(p) for p in engine.parameters} == {id(p) for p in model.parameters()}
        assert len(engine.parameters) == len(list(model.parameters()))
        inputs, targets, _ = make_batch()
        engine.clipped_grad_sum(inputs, targets)
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_tied_norm_needs_cross_term():
    model = make_model(torch.float64, tie_embeddings=True)
    inputs, targets, _ = make_batch()
    norms = clipped_grad_sum(model, inputs, targets, 1.0)
    # The same weights untied: the embedding's and the head's gradients come out separately.
    untied = make_model(torch.float64, tie_embeddings=False)
    untied.load_state_dict(model.state_dict())
    untied.lm_head.weight.data.copy_(model.embed_tokens.weight)
    grads = per_example_grads(untied, inputs, targets)
    names = [n for n, _ in untied.named_parameters()]
    emb, head = names.index("embed_tokens.weight"), names.index("lm_head.weight")
    joint = torch.stack([torch.sqrt(sum((g if i != emb else g + gs[head]).pow(2).sum()
                                        for i, g in enumerate(gs) if i != head)) for gs in grads])
    per_module = torch.stack([torch.sqrt(sum(g.pow(2).sum() for g in gs)) for gs in grads])
    assert rel(norms, joint) < 1e-10
    real = [0, 1, 2, 4]
    # Per-module norms are off by 0.1-2 % here: a million times the tolerance the engine meets.
    assert ((per_module[real] - joint[real]).abs() / joint[real]).min() > 1e-4


def test_clipped_contribution_norm_at_most_c():
    model = make_model(torch.float32)
    inputs, targets, _ = make_batch()
    for c in (0.05, 0.5):
        for i in range(inputs.shape[0]):
            model.zero_grad(set_to_none=True)
            w = torch.zeros(inputs.shape[0]); w[i] = 1.0
            norm = clipped_grad_sum(model, inputs, targets, c, w)[i]
            total = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model.parameters()))
            assert total <= c + 1e-6
            if norm > c:
                assert total == pytest.approx(c, rel=1e-4)


def test_padding_example_contributes_nothing():
    model = make_model()
    inputs, targets, _ = make_batch()
    w = torch.zeros(inputs.shape[0])
    norms = clipped_grad_sum(model, inputs, targets, 1.0, w)
    assert (norms[[0, 1, 2, 4]] > 0).all()
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters())


def test_calls_accumulate():
    model = make_model(torch.float64)
    inputs, targets, weights = make_batch()
    engine = DPEngine(model, 1.0)
    engine.clipped_grad_sum(inputs[:2], targets[:2], weights[:2])
    engine.clipped_grad_sum(inputs[2:], targets[2:], weights[2:])
    _, ref = naive_clipped_grad_sum(model, inputs, targets, 1.0, weights)
    for p, r in zip(unique_trainable(model), ref):
        assert rel(p.grad, r) < 1e-10


class _Toy(nn.Module):
    """Generic layers: a Linear with bias used twice, an untied head, an Embedding with padding_idx."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8, padding_idx=0)
        self.shared = nn.Linear(8, 8)
        self.head = nn.Linear(8, 20)

    def forward(self, ids):
        x = self.emb(ids)
        x = torch.tanh(self.shared(x))
        x = torch.tanh(self.shared(x)) + x
        return self.head(x)


@pytest.mark.parametrize("method", ["ghost", "instantiate"])
def test_generic_modules_reused_and_biased(method):
    torch.manual_seed(0)
    model = _Toy().double()
    inputs, targets, weights = make_batch(vocab=20)
    ref_norms, ref = naive_clipped_grad_sum(model, inputs, targets, 0.7, weights)
    norms = DPEngine(model, 0.7, norm_method=method).clipped_grad_sum(inputs, targets, weights)
    assert rel(norms, ref_norms) < 1e-10
    for p, r in zip(unique_trainable(model), ref):
        assert rel(p.grad, r) < 1e-10


def test_unsupported_layer_is_named():
    model = make_model()
    model.layers[1].extra = nn.LayerNorm(16)
    with pytest.raises(UserError, match=r"layers\.1\.extra.*LayerNorm"):
        DPEngine(model, 1.0)
    model.layers[1].extra.requires_grad_(False)  # frozen: nothing to privatise
    DPEngine(model, 1.0)
    model.scale = nn.Parameter(torch.ones(()))
    with pytest.raises(UserError, match="<root>"):
        DPEngine(model, 1.0)
    emb = nn.Embedding(5, 3, max_norm=1.0)
    with pytest.raises(UserError, match="max_norm"):
        DPEngine(emb, 1.0)


def test_nonfinite_example_is_zeroed_and_counted():
    model = make_model(torch.float64)
    inputs, targets, weights = make_batch()

    def poison(module, args, out):  # an infinite output-gradient for example 1 only
        def inject(grad):
            grad = grad.clone()
            grad[1] = float("inf")
            return grad
        out.register_hook(inject)

    handle = model.layers[0].mlp.down_proj.register_forward_hook(poison)
    engine = DPEngine(model, 1.0)
    norms = engine.clipped_grad_sum(inputs, targets, weights)
    handle.remove()
    assert not torch.isfinite(norms[1]) and torch.isfinite(norms[[0, 2, 3, 4]]).all()
    clean = weights.clone(); clean[1] = 0
    _, ref = naive_clipped_grad_sum(model, inputs, targets, 1.0, clean)
    for p, r in zip(unique_trainable(model), ref):
        assert torch.isfinite(p.grad).all()
        assert rel(p.grad, r) < 1e-10
    stats = engine.stats
    assert (stats.examples, stats.nonfinite) == (4, 1)  # example 2 has weight 0


def test_huge_logits_do_not_skip_the_step():
    model = make_model(torch.float32, tie_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight[:, :] = 1e30  # overflows the forward pass for every example
    inputs, targets, _ = make_batch()
    engine = DPEngine(model, 1.0)
    engine.clipped_grad_sum(inputs, targets)
    assert engine.stats.nonfinite >= 1
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    engine.privatize(Mechanism(1.0, 1.0, 8, 8), lambda s, d, t: torch.randn(s, device=d, dtype=t))  # the step still happens


def test_stats_count_clipping():
    model = make_model()
    inputs, targets, weights = make_batch()
    engine = DPEngine(model, 4.5)
    norms = engine.clipped_grad_sum(inputs, targets, weights)
    real = weights > 0
    assert engine.stats.examples == int(real.sum())
    assert 0 < engine.stats.clipped == int((real & (norms > 4.5)).sum()) < engine.stats.examples
    engine.reset_stats()
    assert engine.stats.examples == 0


def _gaussian(seed):
    g = torch.Generator().manual_seed(seed)
    return lambda shape, device, dtype: torch.randn(shape, generator=g, device=device, dtype=dtype)


def test_noise_variance_and_once_per_step():
    model = make_model(vocab_size=2000, hidden_size=32, intermediate_size=64, head_dim=8)
    engine = DPEngine(model, 0.5)
    engine.add_noise(3.0, _gaussian(0))  # grads were None: pure noise
    z = torch.cat([p.grad.flatten() for p in engine.parameters]).double()
    n, expected = z.numel(), (3.0 * 0.5) ** 2
    assert n > 50_000
    assert abs(float(z.mean())) < 5 * math.sqrt(expected / n)
    assert abs(float(z.var()) / expected - 1) < 5 * math.sqrt(2 / n)
    with pytest.raises(RuntimeError, match="already"):
        engine.add_noise(3.0, _gaussian(1))
    inputs, targets, _ = make_batch(vocab=2000)
    with pytest.raises(RuntimeError, match="zero_grad"):
        engine.clipped_grad_sum(inputs, targets)
    engine.zero_grad()
    engine.add_noise(3.0, _gaussian(1))  # allowed again after a reset


def test_noise_added_once_to_clipped_sum_then_normalized():
    model = make_model(torch.float64)
    inputs, targets, weights = make_batch()
    engine = DPEngine(model, 1.0)
    engine.clipped_grad_sum(inputs, targets, weights)
    clipped = [p.grad.clone() for p in engine.parameters]
    engine.privatize(Mechanism(0.7, 1.0, 16, 16), _gaussian(5))
    z = _gaussian(5)
    for p, c in zip(engine.parameters, clipped):
        expect = (c + 0.7 * 1.0 * z(p.shape, p.device, p.dtype)) / 16.0
        assert torch.allclose(p.grad, expect, rtol=1e-12, atol=1e-15)
    with pytest.raises(RuntimeError, match="normalized"):
        engine.normalize(16.0)
    with pytest.raises(RuntimeError):
        engine.add_noise(0.7, _gaussian(6))
    model.zero_grad(set_to_none=True)  # optimizer.zero_grad() style reset also re-arms noise
    engine.clipped_grad_sum(inputs, targets, weights)
    engine.privatize(Mechanism(0.7, 1.0, 16, 16), _gaussian(6))
    model.zero_grad(set_to_none=False)  # zeroing in place cannot be told from no reset: refused
    with pytest.raises(RuntimeError, match="zero_grad"):
        engine.clipped_grad_sum(inputs, targets, weights)


def test_bad_input_is_a_user_error():
    model = make_model()
    engine = DPEngine(model, 1.0)
    inputs, targets, weights = make_batch()
    with pytest.raises(UserError, match="targets"):
        engine.clipped_grad_sum(inputs, targets[:, :3])
    with pytest.raises(UserError, match="weights"):
        engine.clipped_grad_sum(inputs, targets, -weights)
    with pytest.raises(UserError, match="max_grad_norm"):
        DPEngine(model, 0.0)
    with pytest.raises(UserError, match="expected_batch_size"):
        engine.normalize(0)


def test_bf16_autocast_norms_are_float32_and_close():
    model = make_model()
    inputs, targets, _ = make_batch()
    ref = clipped_grad_sum(model, inputs, targets, 1.0)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        norms = clipped_grad_sum(model, inputs, targets, 1.0)
    assert norms.dtype == torch.float32
    assert rel(norms, ref) < 0.05
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.gpu
def test_cuda_matches_naive_and_runs_bf16():
    model = make_model().cuda()
    inputs, targets, weights = (t.cuda() for t in make_batch())
    ref_norms, ref = naive_clipped_grad_sum(model, inputs, targets, 1.0, weights)
    engine = DPEngine(model, 1.0)
    norms = engine.clipped_grad_sum(inputs, targets, weights)
    assert rel(norms, ref_norms) < 1e-4  # TF32 may be on
    for p, r in zip(unique_trainable(model), ref):
        assert rel(p.grad, r) < 1e-3
    engine.zero_grad()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        norms = engine.clipped_grad_sum(inputs, targets, weights)
    assert norms.dtype == torch.float32 and rel(norms, ref_norms) < 0.05


# --- units of several sequences (user- or document-level privacy) ------------------------------

def make_unit_batch(seed=2, k=3, seq=12, vocab=40):
    """Three units of k rows: unit 1 has one real sequence and k - 1 padding rows."""
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randint(0, 6, (3 * k, seq), generator=g)  # few ids: tokens repeat across a unit's rows
    targets = torch.randint(0, vocab, (3 * k, seq), generator=g)
    targets[1, :5] = -100              # ignored positions inside a unit
    targets[k + 1:2 * k] = -100        # padding rows of the one-sequence unit
    targets[2 * k, 8:] = -100          # a padded last sequence
    return inputs, targets


@pytest.mark.parametrize("method", ["auto", "ghost", "instantiate"])
@pytest.mark.parametrize("variant", ["tied-mha-softcap", "untied-gqa"])
def test_unit_clipping_matches_naive_unit_loop(variant, method):
    from dptrain.dp.reference import naive_unit_clipped_grad_sum

    k = 3
    model = make_model(torch.float64, **VARIANTS[variant])
    inputs, targets = make_unit_batch(k=k)
    weights = torch.tensor([1.0, 1.0, 0.5], dtype=torch.float64)
    norms, _ = naive_unit_clipped_grad_sum(model, inputs, targets, 1.0, k, weights)
    c = float(norms.min() + norms.max()) / 2  # clips some units, not all
    ref_norms, ref_sums = naive_unit_clipped_grad_sum(model, inputs, targets, c, k, weights)
    engine = DPEngine(model, c, norm_method=method)
    # units split across two micro-batches: 2 units, then 1
    first = engine.clipped_grad_sum(inputs[:2 * k], targets[:2 * k], weights[:2], unit_size=k)
    second = engine.clipped_grad_sum(inputs[2 * k:], targets[2 * k:], weights[2:], unit_size=k)
    assert rel(torch.cat([first, second]), ref_norms) < 1e-10
    for p, ref in zip(unique_trainable(model), ref_sums):
        assert rel(p.grad, ref) < 1e-10
    # the unit's norm is not the rows' norms combined: the cross terms between its sequences count
    rows = DPEngine(model, c, norm_method=method).clipped_grad_sum(inputs[:k], targets[:k])
    assert abs(float(first[0]) - float(rows.square().sum().sqrt())) > 1e-6 * float(first[0])
    # a unit of one real sequence (the rest padding rows) is that sequence alone
    alone = DPEngine(model, c, norm_method=method).clipped_grad_sum(inputs[k:k + 1], targets[k:k + 1])
    assert rel(first[1:2], alone) < 1e-10


def test_unit_size_one_is_the_sequence_level_engine():
    model = make_model()
    inputs, targets, weights = make_batch()
    a = DPEngine(model, 0.5).clipped_grad_sum(inputs, targets, weights)
    grads = [p.grad.clone() for p in unique_trainable(model)]
    for p in model.parameters():
        p.grad = None
    b = DPEngine(model, 0.5).clipped_grad_sum(inputs, targets, weights, unit_size=1)
    assert torch.equal(a, b)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, unique_trainable(model)))


def test_unit_size_must_divide_the_rows():
    model = make_model()
    inputs, targets, _ = make_batch()  # 5 rows
    with pytest.raises(UserError, match="unit_size"):
        clipped_grad_sum(model, inputs, targets, 1.0, unit_size=2)
    with pytest.raises(UserError, match=r"weights must have shape \[1\]"):
        clipped_grad_sum(model, inputs, targets, 1.0, torch.ones(5), unit_size=5)
