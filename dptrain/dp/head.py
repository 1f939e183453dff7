"""The output head and its cross-entropy over chunks of tokens: the [B, T, V] logits never exist.

The loss is the last node of the graph, so d(sum L)/d logits is known as soon as a chunk's logits
are: each chunk's logits, float32 cross-entropy, output-gradient g = softmax - onehot (per-example
mean, soft-capping's derivative applied), input-gradient g W and, when the weight needs one, g^T h
are all formed in the forward pass and the chunk is dropped. Backward only scales what was kept.
Same matmul flops as logits + autograd (2 N V d forward, 4 N V d backward), no float32 [B, T, V].

The DP engine asks for the output-gradient g ([B, T, V] in the compute dtype: bf16 under
autocast) to take the head's per-example norms and clipped sum; non-private training does not.
"""
from __future__ import annotations

import torch

from dptrain.dp import loss as loss_mod
from dptrain.dp.layers import Precision, mixed_matmul

CHUNK_ELEMENTS = 2**26  # logits per chunk: 256 MiB in float32, whatever the vocabulary


class _ChunkedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, weights, cap, compute, reduce, keep, chunk_rows):
        b, t, d = hidden.shape
        vocab = weight.shape[0]
        acc = torch.promote_types(compute, torch.float32)
        prec = Precision(compute, acc)
        flat_h = hidden.reshape(b * t, d)
        flat_y = targets.reshape(b * t)
        example = torch.arange(b, device=hidden.device).repeat_interleave(t)
        scale = loss_mod.token_scale(targets, acc)
        if weights is not None:
            scale = scale * weights.to(acc).unsqueeze(1)
        scale = scale.reshape(b * t)
        w = weight.to(compute)
        losses = torch.zeros(b, dtype=acc, device=hidden.device)
        grad_h = torch.empty_like(flat_h)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if ctx.needs_input_grad[1] else None
        out_grad = torch.empty(b * t, vocab, dtype=compute, device=hidden.device) if keep is not None else None
        for r0 in range(0, b * t, chunk_rows):
            rows = slice(r0, min(r0 + chunk_rows, b * t))
            h = flat_h[rows].to(compute)
            z = (h @ w.T).to(acc)  # the logits a compute-dtype Linear would produce, upcast as the loss does
            if cap is not None:
                tanh = torch.tanh(z / cap)
                z = tanh * cap
            tokens, g = loss_mod.token_losses_and_grads(z, flat_y[rows], scale[rows])
            losses.index_add_(0, example[rows], tokens)
            if cap is not None:
                g.mul_(1 - tanh.square())
            g = g.to(compute)
            grad_h[rows] = (g @ w).to(grad_h.dtype)
            if grad_w is not None:
                grad_w.add_(mixed_matmul(g.T, h, prec))
            if out_grad is not None:
                out_grad[rows] = g
        if keep is not None:
            keep["output_grad"] = out_grad.view(b, t, vocab)
        ctx.reduce, ctx.keep, ctx.weight_dtype = reduce, keep, weight.dtype
        ctx.save_for_backward(grad_h.view(b, t, d), *([grad_w] if grad_w is not None else []))
        return losses.sum() if reduce else losses

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, *grad_w = ctx.saved_tensors
        if ctx.reduce:
            scale = grad_out.to(grad_h.dtype)
            gh = grad_h * scale
            gw = (grad_w[0] * grad_out).to(ctx.weight_dtype) if grad_w else None
        else:  # per-example losses: each example's gradients scale with its own grad_out
            gh = grad_h * grad_out.to(grad_h.dtype).view(-1, 1, 1)
            gw = None
            if ctx.keep is not None:
                ctx.keep["output_grad"].mul_(grad_out.to(ctx.keep["output_grad"].dtype).view(-1, 1, 1))
        return gh, gw, None, None, None, None, None, None, None


def head_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, cap: float | None,
              reduce: bool = False, keep: dict | None = None, chunk_rows: int | None = None,
              weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per-example mean cross-entropy of softcap(hidden @ weight^T) against `targets`, by chunks.

    Returns L [B] (float32; float64 for float64 inputs), or sum_i w_i L_i when `reduce` (w_i from
    `weights` [B], default 1; then the weight may take a gradient: a clipped sum's second pass).
    `keep`, a dict, receives "output_grad": d(sum L)/d(hidden @ weight^T), [B, T, V] in the compute
    dtype, scaled by the backward's grad_out once backward has run.
    """
    if weight.requires_grad and not reduce:
        raise ValueError("a per-example head loss takes no weight gradient; pass weight.detach()")
    if weights is not None and not reduce:
        raise ValueError("weights apply to the reduced loss only")
    device = hidden.device.type
    compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    if hidden.dtype == torch.float64:
        compute = torch.float64
    rows = chunk_rows or max(1, CHUNK_ELEMENTS // weight.shape[0])
    with torch.autocast(device, enabled=False):
        return _ChunkedHeadLoss.apply(hidden, weight, targets, weights, cap, compute, reduce, keep, rows)


def model_head_loss(model, inputs: torch.Tensor, targets: torch.Tensor, reduce: bool = False,
                    keep: dict | None = None, weights: torch.Tensor | None = None) -> torch.Tensor:
    """`head_loss` through a `dptrain.model.Decoder`'s forward (its head weight and soft-cap)."""
    def head(hidden):
        weight = model.lm_head.weight if reduce else model.lm_head.weight.detach()
        return head_loss(hidden, weight, targets, model.cfg.final_logit_softcapping, reduce=reduce, keep=keep,
                         weights=weights)
    return model(inputs, head=head)


def supports_chunked_head(model) -> bool:
    """A Decoder whose head is a bias-free Linear: its loss can be taken by chunks."""
    from dptrain.model import Decoder

    head = getattr(model, "lm_head", None)
    return isinstance(model, Decoder) and isinstance(head, torch.nn.Linear) and head.bias is None
