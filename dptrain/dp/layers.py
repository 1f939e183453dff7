"""Per-layer rules: what each supported module records, and its per-example gradient algebra.

Every supported parameter's per-example gradient takes one of two forms:

* outer-product form, G_i = sum_t L_it (x) R_it. nn.Linear weight: L = output-gradient, R = input.
  nn.Embedding weight: L = one-hot of the token id, R = output-gradient. A tied embedding/head is
  one parameter with two such uses, so its exact norm is one Gram computation over both:
  ||G_i||^2 = sum_{u,v} sum_{t,s} <L_ut, L_vs> <R_ut, R_vs>, cross terms (u != v) included.
  Per layer the norm is taken either by this "ghost" Gram identity (cost ~ T^2 (p + d)) or by
  instantiating G_i (cost ~ T p d); the clipped sum is always one matmul (or index_add) with
  per-example scaled output-gradients, so no per-example gradient outlives its norm.
* vector form (Linear bias, RMSNorm gain): the per-example gradient is small and instantiated.

Precision: float32 and float64 models compute everything in their own dtype. Under bf16 (autocast
or bf16 weights) the dense factors are rounded to bf16 once, as the forward's matmuls round them,
and every norm and clipped-sum matmul takes those bf16 operands and sums in float32 (`Precision`).
The clipped sum then runs per example, scaled in float32 after the matmul: scaling a bf16 operand
would round c_i g_i and could lift a contribution's norm above C.

Modules must see the batch on their first dimension (true of every module in `dptrain.model`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from torch._subclasses.fake_tensor import FakeTensor

from dptrain.model import RMSNorm


@dataclass(frozen=True)
class Precision:
    """Matmul operands are rounded to `operand`; products are summed and returned in `acc`."""
    operand: torch.dtype
    acc: torch.dtype

    @property
    def mixed(self) -> bool:
        return self.operand != self.acc


def mixed_matmul(a: torch.Tensor, b: torch.Tensor, prec: Precision) -> torch.Tensor:
    """a @ b (2-D or batched 3-D) from `prec.operand` operands, summed and returned in `prec.acc`."""
    a, b = a.to(prec.operand), b.to(prec.operand)
    if not prec.mixed:
        return torch.matmul(a, b)
    if a.device.type in ("cuda", "meta") or isinstance(a, FakeTensor):
        return (torch.mm if a.dim() == 2 else torch.bmm)(a, b, out_dtype=prec.acc)  # tensor cores
    # No bf16-in/float32-out kernel on CPU: bf16 products are exact in float32, so upcasting
    # gives the same products with float32 sums.
    return torch.matmul(a.to(prec.acc), b.to(prec.acc))


def is_fake(t: torch.Tensor) -> bool:
    """A FakeTensor (shapes only, as `dptrain cost` runs the engine): no value can be read."""
    return isinstance(t, FakeTensor)


@dataclass
class Call:
    """One forward call of a hooked module: its input (activations or token ids) and output."""
    inp: torch.Tensor
    out: torch.Tensor | None
    grad: torch.Tensor | None = None


@dataclass
class Factor:
    """One use of an outer-product-form parameter: G_i = sum_t L_it (x) R_it.

    `left` is [B, T, p] dense, or [B, T] token ids when `onehot`; `right` is [B, T, d].
    """
    left: torch.Tensor
    right: torch.Tensor
    onehot: bool


GRAM_BLOCK = 128  # tokens per block when only one triangle of a symmetric Gram matrix is formed


def token_blocks(tokens: int) -> list[slice]:
    return [slice(s, min(s + GRAM_BLOCK, tokens)) for s in range(0, tokens, GRAM_BLOCK)]


def triangle_fraction(tokens: int) -> float:
    """Share of a T x T Gram matrix that its upper block triangle (diagonal blocks included) covers."""
    sizes = [b.stop - b.start for b in token_blocks(tokens)]
    return sum(sizes[i] * sizes[j] for i in range(len(sizes)) for j in range(i, len(sizes))) / tokens**2


@dataclass
class GramCache:
    """Gram matrices shared between layers fed the same activations (q/k/v, gate/up)."""
    entries: dict = field(default_factory=dict)
    triangles: dict = field(default_factory=dict)

    def dense(self, x: torch.Tensor, y: torch.Tensor, prec: Precision, keep: bool = True) -> torch.Tensor:
        key = (_key(x), _key(y), prec)
        if key in self.entries:
            return self.entries[key][2]
        gram = mixed_matmul(x, y.transpose(1, 2), prec)
        if keep:
            # The tensors are kept alongside the result so their storage cannot be reused for a
            # different tensor with the same key.
            self.entries[key] = (x, y, gram)
        return gram

    def triangle(self, x: torch.Tensor, prec: Precision) -> list[torch.Tensor]:
        """x x^T's upper block triangle as row strips (`_strips`): symmetric, so half the work."""
        key = (_key(x), prec)
        if key not in self.triangles:
            self.triangles[key] = (x, _strips(x, prec))
        return self.triangles[key][1]

    def keep_only(self, tensors: list[torch.Tensor]) -> None:
        """Drop the Gram matrices no later layer will ask for."""
        live = {_key(t) for t in tensors}
        self.entries = {k: v for k, v in self.entries.items() if k[0] in live or k[1] in live}
        self.triangles = {k: v for k, v in self.triangles.items() if k[0] in live}


def _strips(x: torch.Tensor, prec: Precision) -> list[torch.Tensor]:
    """For each block of tokens, [B, block, tokens from the block's start on] of x x^T: one matmul
    per strip, the diagonal block leading."""
    return [mixed_matmul(x[:, b], x[:, b.start:].transpose(1, 2), prec) for b in token_blocks(x.shape[1])]


def _key(x: torch.Tensor):
    # The storage's identity (not data_ptr, which fake tensors lack) and where x sits in it.
    return (x.untyped_storage()._cdata, x.storage_offset(), tuple(x.shape), x.stride(), x.dtype)


def zero_rows(x: torch.Tensor, bad: torch.Tensor | None) -> torch.Tensor:
    """Zero the rows (examples) flagged `bad`, so that 0 * inf never turns into NaN."""
    if bad is None:
        return x
    return x.masked_fill(bad.view(-1, *([1] * (x.dim() - 1))), 0)


def _merge(calls: list[Call], what: str) -> torch.Tensor:
    """Concatenate a module's calls along the token axis: the gradient sums over all of them."""
    if what == "inp":
        parts = [c.inp.reshape(c.inp.shape[0], -1, *([c.inp.shape[-1]] if c.inp.dim() > 2 else []))
                 for c in calls]
    else:
        parts = [c.grad.reshape(c.grad.shape[0], -1, c.grad.shape[-1]) for c in calls]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


# ----------------------------------------------------------------------------------------------
# Module roles. A role turns a module's recorded calls into factors or per-example vectors.

def linear_weight_factor(module: nn.Linear, calls: list[Call]) -> Factor:
    return Factor(left=_merge(calls, "grad"), right=_merge(calls, "inp"), onehot=False)


def embedding_weight_factor(module: nn.Embedding, calls: list[Call]) -> Factor:
    ids = torch.cat([c.inp.reshape(c.inp.shape[0], -1) for c in calls], dim=1)
    grads = _merge(calls, "grad")
    if module.padding_idx is not None:  # that row never receives gradient
        grads = grads.masked_fill((ids == module.padding_idx).unsqueeze(-1), 0)
    return Factor(left=ids, right=grads, onehot=True)


def linear_bias_vectors(module: nn.Linear, calls: list[Call], dtype) -> torch.Tensor:
    return _merge(calls, "grad").to(dtype).sum(1)


def rmsnorm_weight_vectors(module: RMSNorm, calls: list[Call], dtype) -> torch.Tensor:
    # Mirrors RMSNorm.forward, which works in float32: y = normed * (1 + w).
    total = None
    for c in calls:
        xf = c.inp.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + module.eps)
        per_token = c.grad.float() * normed
        vec = per_token.reshape(per_token.shape[0], -1, per_token.shape[-1]).sum(1).to(dtype)
        total = vec if total is None else total + vec
    return total


# (module type, parameter name) -> (form, builder). Subclasses match through isinstance.
ROLES: list[tuple[type, str, str, object]] = [
    (nn.Linear, "weight", "outer", linear_weight_factor),
    (nn.Linear, "bias", "vector", linear_bias_vectors),
    (nn.Embedding, "weight", "outer", embedding_weight_factor),
    (RMSNorm, "weight", "vector", rmsnorm_weight_vectors),
]


def find_role(module: nn.Module, param_name: str):
    for cls, name, form, builder in ROLES:
        if isinstance(module, cls) and name == param_name:
            return form, builder
    return None


def check_module_options(module: nn.Module) -> str | None:
    """Why a supported module type is configured in a way the rules do not cover, else None."""
    if isinstance(module, nn.Embedding):
        if module.max_norm is not None:
            return "max_norm renormalises weights during forward"
        if module.scale_grad_by_freq:
            return "scale_grad_by_freq mixes the examples of a batch"
        if module.sparse:
            return "sparse gradients are not supported"
    return None


# ----------------------------------------------------------------------------------------------
# Norms and clipped sums.

def _left_gram(u: Factor, v: Factor, prec: Precision, cache: GramCache) -> torch.Tensor:
    """[B, Tu, Tv] matrix of <L_ut, L_vs>."""
    dtype = prec.acc
    if u.onehot and v.onehot:
        return (u.left.unsqueeze(2) == v.left.unsqueeze(1)).to(dtype)
    if v.onehot:
        return _left_gram(v, u, prec, cache).transpose(1, 2)
    if u.onehot:  # <e_{x_t}, L_vs> = L_vs[x_t]: gather v's dense rows at u's token ids
        index = u.left.unsqueeze(1).expand(-1, v.left.shape[1], -1)
        return v.left.to(prec.operand).gather(2, index).to(dtype).transpose(1, 2)
    return cache.dense(u.left, v.left, prec, keep=False)  # output-gradients are never shared


def _self_term(f: Factor, prec: Precision, cache: GramCache) -> torch.Tensor:
    """||sum_t L_t (x) R_t||^2 = sum_{t,s} <L_t, L_s><R_t, R_s> over the upper block triangle of
    both (symmetric) Gram matrices: off-diagonal blocks count twice, diagonal blocks once."""
    right = cache.triangle(f.right, prec)
    total = None
    for b, r in zip(token_blocks(f.left.shape[1]), right):
        if f.onehot:
            left = (f.left[:, b].unsqueeze(2) == f.left[:, b.start:].unsqueeze(1)).to(prec.acc)
        else:  # output-gradients are never shared: each strip is used once and dropped
            left = mixed_matmul(f.left[:, b], f.left[:, b.start:].transpose(1, 2), prec)
        size = b.stop - b.start
        prod = left * r
        term = 2 * prod.sum((1, 2)) - prod[:, :, :size].sum((1, 2))
        total = term if total is None else total + term
    return total


def ghost_sq_norms(factors: list[Factor], prec: Precision, cache: GramCache) -> torch.Tensor:
    total = None
    for i, u in enumerate(factors):
        for j in range(i, len(factors)):
            v = factors[j]
            if i == j:
                term = _self_term(u, prec, cache)
            else:  # a cross term (a tied or reused weight): not symmetric, 2 sum_{t,s} left * right
                left, right = _left_gram(u, v, prec, cache), cache.dense(u.right, v.right, prec)
                term = 2 * (left * right).sum((1, 2))
            total = term if total is None else total + term
    return total


def instantiated_sq_norms(factors: list[Factor], prec: Precision) -> torch.Tensor:
    grads = sum(mixed_matmul(f.left.transpose(1, 2), f.right, prec) for f in factors)
    return grads.square().sum((1, 2))


def choose_ghost(groups: list[list[Factor]]) -> list[bool]:
    """Ghost norm or instantiation for each outer-product group, whichever takes fewer flops.

    Per example, instantiating a p x d gradient from T tokens costs 2 T p d; its ghost norm costs
    f 2 T^2 p for the output-gradients' Gram matrix and f 2 T^2 d for the inputs', f being the
    share of one block triangle (about 1/2 at large T). Layers fed the same input (q/k/v, gate/up)
    share the inputs' Gram matrix, so they are decided together: all ghost (f 2 T^2 (d + sum p))
    or all instantiated (2 T d sum p). Embeddings, and weights used more than once, take the ghost
    norm: an embedding's gradient is V x d per example.
    """
    choice = [True] * len(groups)
    by_input: dict = {}
    for n, factors in enumerate(groups):
        if len(factors) == 1 and not factors[0].onehot:
            by_input.setdefault(_key(factors[0].right), []).append(n)
    for members in by_input.values():
        tokens, d = groups[members[0]][0].right.shape[1:]
        widths = sum(groups[n][0].left.shape[-1] for n in members)
        ghost = triangle_fraction(tokens) * tokens * (d + widths) <= d * widths
        for n in members:
            choice[n] = ghost
    return choice


def add_outer_clipped_sum(param: torch.nn.Parameter, factors: list[Factor], coef: torch.Tensor,
                          bad: torch.Tensor | None, prec: Precision) -> None:
    """param.grad += sum_i coef_i G_i, one matmul (or index_add) per use."""
    for f in factors:
        if f.onehot:
            scaled = zero_rows(f.right, bad).to(prec.acc) * coef.to(prec.acc).view(-1, 1, 1)
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            param.grad.index_add_(0, f.left.reshape(-1), scaled.reshape(-1, scaled.shape[-1]).to(param.dtype))
        elif prec.mixed:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            _add_per_example(param.grad, f, coef, prec)
        else:
            _add_batched(param, f, coef, bad)


def _add_batched(param: torch.nn.Parameter, f: Factor, coef: torch.Tensor, bad: torch.Tensor | None) -> None:
    dtype = param.dtype
    left, right = zero_rows(f.left, bad).to(dtype), zero_rows(f.right, bad).to(dtype)
    # Scale whichever side is narrower: same result, fewer multiplications.
    if left.shape[-1] <= right.shape[-1]:
        left = left * coef.to(dtype).view(-1, 1, 1)
    else:
        right = right * coef.to(dtype).view(-1, 1, 1)
    left, right = left.reshape(-1, left.shape[-1]), right.reshape(-1, right.shape[-1])
    if param.grad is None:
        param.grad = left.T @ right
    else:
        param.grad.addmm_(left.T, right)


def _add_per_example(grad: torch.Tensor, f: Factor, coef: torch.Tensor, prec: Precision) -> None:
    """sum_i coef_i (L_i^T R_i): each matmul from bf16 operands into float32, scaled in float32.

    Same flops as one batched matmul; examples with coef 0 (padding, non-finite) are skipped.
    """
    if is_fake(coef):  # no values to skip on: count every example's matmul
        for i in range(coef.shape[0]):
            grad.add_(mixed_matmul(f.left[i].T, f.right[i], prec).mul_(coef[i]))
        return
    for i, c in enumerate(coef.tolist()):
        if c != 0.0:
            grad.add_(mixed_matmul(f.left[i].T, f.right[i], prec), alpha=c)


def add_vector_clipped_sum(param: torch.nn.Parameter, vectors: torch.Tensor, coef: torch.Tensor,
                           bad: torch.Tensor | None) -> None:
    vectors = zero_rows(vectors, bad)
    total = torch.einsum("b,b...->...", coef.to(vectors.dtype), vectors).to(param.dtype)
    if param.grad is None:
        param.grad = total
    else:
        param.grad.add_(total)
