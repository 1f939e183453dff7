"""Counted cost of one micro-batch step, on fake tensors: any config, no memory allocated.

The step runs for real under `FakeTensorMode` (shapes and dtypes only), inside one dispatch mode
that counts each operator's matmul flops with torch's formulas (`torch.utils.flop_counter`, plus
the ones it lacks, registered below) and tracks every storage an operator creates until Python
frees it: the sum of live storages is the memory the step holds, its maximum the peak. Flops are
split by the step's parts (`dptrain.dp.phases`). Opacus ghost clipping cannot run on fake tensors
(its hooks read values), so its flops come from a formula (`opacus_ghost_flops`), checked against a
real count in the tests.

Memory counts tensors, not allocator overhead (a CUDA caching allocator rounds and fragments), and
it excludes what lives across steps: weights, their .grad (allocated before the counted step, as on
every micro-batch after the first) and optimizer state, which `fit` adds.
"""
from __future__ import annotations

import contextlib
import weakref
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from dptrain.dp.engine import DPEngine
from dptrain.dp.head import model_head_loss
from dptrain.dp.loss import per_example_loss
from dptrain.dp.phases import current, phase
from dptrain.model import Decoder, DecoderConfig, parameter_counts

aten = torch.ops.aten


def _register_missing_formulas() -> None:
    """Flop formulas torch's counter lacks: in-place addmm_/baddbmm_ and CPU flash attention."""
    registry = flop_counter.flop_registry
    registry.setdefault(aten.addmm_, registry[aten.addmm])
    registry.setdefault(aten.baddbmm_, registry[aten.baddbmm])
    if aten._scaled_dot_product_flash_attention_for_cpu not in registry:
        @flop_counter.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
        def _sdpa_cpu(query, key, value, *args, out_shape=None, **kwargs) -> int:
            return flop_counter.sdpa_flop_count(query, key, value)

        @flop_counter.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
        def _sdpa_cpu_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
            return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


_register_missing_formulas()


@dataclass
class Counts:
    flops: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # by phase
    peak_bytes: int = 0
    peak_phase: str = ""

    @property
    def total_flops(self) -> int:
        return sum(self.flops.values())


class StepCounter(TorchDispatchMode):
    """Matmul flops by phase and the peak of live tensor storages, for whatever runs inside it."""

    def __init__(self):
        super().__init__()
        self.counts = Counts()
        self._live: dict[int, int] = {}
        self._bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_counter.flop_registry.get(func._overloadpacket)
        if formula is not None:
            if func._overloadname == "dtype":  # mm/bmm(a, b, out_dtype): the formula takes a, b
                args, kwargs = args[:2], {}
            self.counts.flops[_phase_group()] += int(formula(*args, **kwargs, out_val=out))
        self._track(args, kwargs, out)
        return out

    def _track(self, args, kwargs, out) -> None:
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in inputs or key in self._live:
                continue  # a view or an in-place result: no new memory
            self._live[key] = storage.nbytes()
            self._bytes += storage.nbytes()
            weakref.finalize(storage, self._release, key)
            if self._bytes > self.counts.peak_bytes:
                self.counts.peak_bytes, self.counts.peak_phase = self._bytes, _phase_group()

    def _release(self, key: int) -> None:
        self._bytes -= self._live.pop(key, 0)


def _phase_group() -> str:
    """'norms:layers.3.mlp.up_proj.weight' -> 'norms: mlp'; other phases unchanged."""
    name = current()
    if not name.startswith("norms:"):
        return name
    param = name[len("norms:"):]
    for part, label in (("embed_tokens", "embedding/head"), ("lm_head", "embedding/head"),
                        ("mlp.", "mlp"), ("self_attn.", "attention"), ("norm", "rmsnorm gains")):
        if part in param:
            return f"norms: {label}"
    return "norms: other"


# ----------------------------------------------------------------------------------------------
# The steps. Each runs on whatever tensors it is given (fake for `dptrain cost`, real in tests).

def _autocast(dtype: str):
    if dtype == "bfloat16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def nonprivate_step(model: Decoder, inputs, targets, dtype: str) -> None:
    """The same chunked head and loss as the DP step (`dptrain.dp.head`), so the two compare fairly."""
    with _autocast(dtype):
        with phase("forward"):
            loss = model_head_loss(model, inputs, targets, reduce=True)
        with phase("backward"):
            loss.backward()


def logits_step(model: Decoder, inputs, targets, dtype: str) -> None:
    """Non-private with the whole [B, T, V] logits and `per_example_loss`: the unchunked baseline."""
    with _autocast(dtype):
        with phase("forward"):
            loss = per_example_loss(model(inputs), targets).sum()
        with phase("backward"):
            loss.backward()


def dptrain_step(engine: DPEngine, inputs, targets, dtype: str) -> None:
    with _autocast(dtype):
        engine.clipped_grad_sum(inputs, targets)


def count_step(cfg: DecoderConfig, method: str, micro_batch: int, seq_len: int, dtype: str = "float32",
               fake: bool = True, seed: int = 0) -> Counts:
    """Counts of one micro-batch step of `method`: "nonprivate", "dptrain" or "logits" (non-private
    without the chunked head)."""
    mode = torch._subclasses.fake_tensor.FakeTensorMode() if fake else contextlib.nullcontext()
    with mode:
        torch.manual_seed(seed)
        model = Decoder(cfg)
        inputs = torch.randint(0, cfg.vocab_size, (micro_batch, seq_len))
        targets = torch.randint(0, cfg.vocab_size, (micro_batch, seq_len))
        for p in model.parameters():  # .grad lives across micro-batches: not the step's memory
            p.grad = torch.zeros_like(p)
        engine = DPEngine(model, 1.0) if method == "dptrain" else None
        counter = StepCounter()
        with counter:
            if engine is not None:
                dptrain_step(engine, inputs, targets, dtype)
            elif method == "logits":
                logits_step(model, inputs, targets, dtype)
            else:
                nonprivate_step(model, inputs, targets, dtype)
        if engine is not None:
            engine.remove()
    return counter.counts


def opacus_ghost_flops(cfg: DecoderConfig, micro_batch: int, seq_len: int, nonprivate: Counts) -> dict[str, int]:
    """Opacus 1.6 ghost clipping's matmul flops, by part.

    Its loss wrapper runs a full backward (weight gradients included, then discarded) with hooks
    that take every Linear's ghost norm by einsum: g g^T, a a^T and their dot product, 2 B T^2
    (p + d + 1) flops, the untied head included; the embedding's norm uses no matmul, the RMSNorm
    gains go through functorch per-sample gradients (elementwise). A second full backward of the
    reweighted loss then forms the clipped sum. The forward is the textbook count (2 flops per
    matmul weight per token, attention's QK^T and AV); the backward is the rest of the counted
    non-private step.
    """
    b, t = micro_batch, seq_len
    h, kv, dh = cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, cfg.head_dim
    shapes = [(cfg.num_heads * dh, h), (kv, h), (kv, h), (h, cfg.num_heads * dh),
              (cfg.intermediate_size, h), (cfg.intermediate_size, h), (h, cfg.intermediate_size)]
    matmul_params = cfg.num_layers * sum(p * d for p, d in shapes) + cfg.vocab_size * h
    forward = 2 * matmul_params * b * t + 4 * b * cfg.num_layers * cfg.num_heads * t * t * dh
    backward = nonprivate.total_flops - forward
    layer = sum(2 * b * t * t * (p + d + 1) for p, d in shapes)
    head = 2 * b * t * t * (cfg.vocab_size + h + 1)
    return {"forward": forward, "backward": backward, "norms": cfg.num_layers * layer + head,
            "second backward": backward}


def static_bytes(cfg: DecoderConfig) -> int:
    """Float32 weights, gradients and two Adam moments: what lives across steps."""
    return 16 * parameter_counts(cfg)["total"]


def largest_micro_batch(one: Counts, two: Counts, cfg: DecoderConfig, memory_bytes: float) -> int:
    """From the peaks at micro-batch 1 and 2 (linear in the batch), the largest that fits."""
    per_seq = two.peak_bytes - one.peak_bytes
    fixed = one.peak_bytes - per_seq + static_bytes(cfg)
    if per_seq <= 0:
        return 0
    return max(0, int((memory_bytes - fixed) // per_seq))
