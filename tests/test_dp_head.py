"""The chunked head: same losses and gradients as logits + cross-entropy, no float32 [B, T, V]."""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from dptrain.dp import DPEngine, head, per_example_loss
from dptrain.dp.reference import naive_clipped_grad_sum, unique_trainable
from dptrain.model import Decoder, DecoderConfig, softcap
from test_dp_engine import VARIANTS, make_batch, make_model, rel


@pytest.mark.parametrize("variant", ["tied-mqa", "untied-mqa-softcap"])
def test_chunked_loss_and_gradients_match_full_logits(variant):
    model = make_model(torch.float64, **VARIANTS[variant])
    inputs, targets, _ = make_batch()
    ref = per_example_loss(model(inputs), targets)
    ref.sum().backward()
    ref_grads = [p.grad.clone() for p in unique_trainable(model)]
    model.zero_grad(set_to_none=True)

    h = model.hidden(inputs)
    losses = head.head_loss(h, model.lm_head.weight.detach(), targets, model.cfg.final_logit_softcapping,
                            chunk_rows=7)  # 60 tokens in 9 chunks, crossing example boundaries
    assert rel(losses.detach(), ref.detach()) < 1e-12
    total = head.head_loss(model.hidden(inputs), model.lm_head.weight, targets,
                           model.cfg.final_logit_softcapping, reduce=True, chunk_rows=7)
    (2.0 * total).backward()
    for p, r in zip(unique_trainable(model), ref_grads):
        assert rel(p.grad, 2.0 * r) < 1e-10


def test_kept_output_gradient_is_the_head_output_gradient():
    """The gradient at lm_head's output (before soft-capping), scaled per example by grad_out."""
    model = make_model(torch.float64, **VARIANTS["untied-mqa-softcap"])
    inputs, targets, _ = make_batch()
    out = model.lm_head(model.hidden(inputs))
    logits = softcap(out, model.cfg.final_logit_softcapping)
    scale = torch.tensor([1.0, 2.0, 0.0, 1.0, 0.5], dtype=torch.float64)
    ref = torch.autograd.grad((per_example_loss(logits, targets) * scale).sum(), out)[0]
    keep = {}
    h = model.hidden(inputs)
    losses = head.head_loss(h, model.lm_head.weight.detach(), targets, model.cfg.final_logit_softcapping,
                            keep=keep, chunk_rows=4)
    (losses * scale).sum().backward()
    assert rel(keep["output_grad"], ref) < 1e-12


def test_weighted_reduced_loss_matches_full_logits():
    """sum_i w_i L_i with a weight gradient: the second pass of a two-pass clipped sum."""
    model = make_model(torch.float64, **VARIANTS["tied-mha-softcap"])
    inputs, targets, _ = make_batch()
    w = torch.tensor([0.3, 1.0, 0.0, 2.0, 0.5], dtype=torch.float64)
    (per_example_loss(model(inputs), targets) * w).sum().backward()
    ref = [p.grad.clone() for p in unique_trainable(model)]
    model.zero_grad(set_to_none=True)
    head.model_head_loss(model, inputs, targets, reduce=True, weights=w).backward()
    for p, r in zip(unique_trainable(model), ref):
        assert rel(p.grad, r) < 1e-10


def test_per_example_loss_refuses_a_weight_gradient():
    model = make_model()
    inputs, targets, _ = make_batch()
    with pytest.raises(ValueError, match="detach"):
        head.head_loss(model.hidden(inputs), model.lm_head.weight, targets, None)


def test_engine_with_many_chunks_matches_naive(monkeypatch):
    monkeypatch.setattr(head, "CHUNK_ELEMENTS", 3 * 40)  # 3 tokens per chunk
    model = make_model(torch.float64, **VARIANTS["tied-mha-softcap"])
    inputs, targets, weights = make_batch()
    ref_norms, ref = naive_clipped_grad_sum(model, inputs, targets, 0.5, weights)
    norms = DPEngine(model, 0.5).clipped_grad_sum(inputs, targets, weights)
    assert rel(norms, ref_norms) < 1e-10
    for p, r in zip(unique_trainable(model), ref):
        assert rel(p.grad, r) < 1e-10


class _LargestFloat32(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("private", [False, True])
def test_bf16_step_never_forms_float32_logits(monkeypatch, private):
    """On fake tensors, which take the accelerator's path (bf16-in/float32-out matmuls; the CPU
    path upcasts bf16 operands instead)."""
    vocab = 400
    monkeypatch.setattr(head, "CHUNK_ELEMENTS", 8 * vocab)
    with FakeTensorMode():
        model = Decoder(DecoderConfig(vocab_size=vocab, hidden_size=16, intermediate_size=24, num_layers=2,
                                      num_heads=4, num_kv_heads=1, head_dim=8, max_seq_len=16,
                                      query_pre_attn_scalar=8.0))
        inputs = torch.randint(0, vocab, (5, 12))
        targets = torch.randint(0, vocab, (5, 12))
        b, t = inputs.shape
        engine = DPEngine(model, 1.0) if private else None
        with _LargestFloat32() as watch, torch.autocast("cpu", dtype=torch.bfloat16):
            if private:
                engine.clipped_grad_sum(inputs, targets)
            else:
                head.model_head_loss(model, inputs, targets, reduce=True).backward()
    assert 0 < watch.largest < b * t * vocab
