"""The engine under bf16: bf16 operands with float32 sums for norms and clipped sums, and every
clipped contribution still within C."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from dptrain.dp import DPEngine, clipped_grad_sum
from dptrain.dp import layers
from dptrain.dp.reference import naive_clipped_grad_sum
from test_dp_engine import make_batch, make_model, rel



def _mixed():
    return layers.Precision(torch.bfloat16, torch.float32)


def _bf16_factors(seed=0, batch=3, tokens=300, p=96, d=80):
    g = torch.Generator().manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=g).to(torch.bfloat16)  # noqa: E731
    return [layers.Factor(make(batch, tokens, p), make(batch, tokens, d), False),
            layers.Factor(make(batch, tokens // 2, p), make(batch, tokens // 2, d), False)]


def _float64_sq_norms(factors):
    grads = sum(torch.bmm(f.left.double().transpose(1, 2), f.right.double()) for f in factors)
    return grads.square().sum((1, 2))


def test_bf16_norm_matmuls_sum_in_float32():
    """Against float64 on the same bf16 operands: a bf16 result (rounded to 8 bits) is ~1e-3 off."""
    factors = _bf16_factors()
    ref = _float64_sq_norms(factors)
    ghost = layers.ghost_sq_norms(factors, _mixed(), layers.GramCache())
    inst = layers.instantiated_sq_norms(factors, _mixed())
    assert ghost.dtype == inst.dtype == torch.float32
    assert rel(ghost.double(), ref) < 1e-5
    assert rel(inst.double(), ref) < 1e-5


def test_bf16_clipped_sum_sums_in_float32():
    factors = _bf16_factors(seed=1)[:1]
    coef = torch.tensor([0.3, 0.0, 1.7])
    param = torch.nn.Parameter(torch.zeros(96, 80))
    layers.add_outer_clipped_sum(param, factors, coef, None, _mixed())
    f = factors[0]
    ref = torch.einsum("b,btp,btd->pd", coef.double(), f.left.double(), f.right.double())
    assert rel(param.grad.double(), ref) < 1e-6


@pytest.mark.parametrize("c", [0.05, 0.5])
def test_bf16_clipped_contribution_norm_at_most_c(c):
    """Each example alone: its clipped contribution's norm is <= C (1 + 1e-6) under bf16 autocast."""
    model = make_model(torch.float32)
    inputs, targets, _ = make_batch()
    for i in (0, 1, 4):
        model.zero_grad(set_to_none=True)
        w = torch.zeros(inputs.shape[0])
        w[i] = 1.0
        with torch.autocast("cpu", dtype=torch.bfloat16):
            norm = float(clipped_grad_sum(model, inputs, targets, c, w)[i])
        total = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model.parameters()))
        assert norm > c  # clipped, so the bound is tight
        assert total <= c * (1 + 1e-6)
        assert total == pytest.approx(c, rel=1e-5)


def test_bf16_norms_against_float64_reference():
    """The whole bf16 step, forward rounding included, against the naive loop in float64."""
    model = make_model(torch.float32)
    inputs, targets, weights = make_batch()
    ref_norms, _ = naive_clipped_grad_sum(model.double(), inputs, targets, 1.0, weights)
    model.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        norms = DPEngine(model, 1.0).clipped_grad_sum(inputs, targets, weights)
    assert norms.dtype == torch.float32
    assert rel(norms.double(), ref_norms) < 1e-2  # measured 3.7e-3: bf16 forward rounding


@pytest.mark.gpu
def test_cuda_bf16_norm_matmuls_are_bf16_with_float32_sums():
    """On CUDA: bf16 operands in every norm and clipped-sum matmul, float32 results, and the
    same bounds as on CPU (norms within 1e-5 of float64 on the same operands, each clipped
    contribution within C (1 + 1e-6), the whole step within 1e-2 of the float64 naive loop)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    factors = [layers.Factor(f.left.cuda(), f.right.cuda(), False) for f in _bf16_factors()]
    ref = _float64_sq_norms([layers.Factor(f.left.cpu(), f.right.cpu(), False) for f in factors])
    ghost = layers.ghost_sq_norms(factors, _mixed(), layers.GramCache())
    assert rel(ghost.double().cpu(), ref) < 1e-5

    class Operands(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.float32 = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.bmm, torch.ops.aten.addmm):
                if any(isinstance(a, torch.Tensor) and a.dtype == torch.float32 for a in args):
                    self.float32.append(func)
            return func(*args, **(kwargs or {}))

    model = make_model(torch.float32).cuda()
    inputs, targets, weights = (t.cuda() for t in make_batch())
    ref_norms, _ = naive_clipped_grad_sum(copy.deepcopy(model).double(), inputs, targets, 1.0, weights)
    with Operands() as watch, torch.autocast("cuda", dtype=torch.bfloat16):
        norms = DPEngine(model, 1.0).clipped_grad_sum(inputs, targets, weights)
    assert watch.float32 == []
    assert rel(norms.double(), ref_norms) < 1e-2
    c = 0.05
    for i in (0, 1, 4):
        model.zero_grad(set_to_none=True)
        w = torch.zeros(inputs.shape[0], device="cuda")
        w[i] = 1.0
        with torch.autocast("cuda", dtype=torch.bfloat16):
            clipped_grad_sum(model, inputs, targets, c, w)
        total = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model.parameters()))
        assert total <= c * (1 + 1e-6)
