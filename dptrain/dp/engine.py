"""DP-SGD's private gradient: exact per-example clipping in one backward pass, then Gaussian noise.

    engine = DPEngine(model, max_grad_norm)
    for micro_batch in logical_batch:
        engine.clipped_grad_sum(inputs, targets, weights)      # adds sum_i w_i clip(g_i) to .grad
    engine.privatize(mechanism, noise)  # noise once, / E[batch] (dptrain.privacy.mechanism)
    optimizer.step(); engine.zero_grad()

One call runs the forward pass with hooks that keep each layer's input, takes the gradients of
sum_i L_i with respect to the layers' outputs (which are per-example, since no layer mixes
examples), computes every example's exact gradient norm over all parameters jointly, and forms the
clipped sum per layer as a matmul with per-example scaled output-gradients ("book-keeping").
A `Decoder`'s loss comes from the chunked head (`dptrain.dp.head`), which hands the engine the
head's output-gradient without ever forming the [B, T, V] logits.

Privacy units of several sequences (`unit_size=k`): each k consecutive rows are one unit whose
gradient is that of the SUM of its rows' losses, clipped as one vector. Every parameter gradient
is a sum over tokens, so viewing the recorded [B, T, ...] activations and output-gradients as
[B/k, k*T, ...] makes every norm (ghost Gram with its cross terms between the unit's sequences,
instantiation, embedding, tied head, norm gains) and every clipped sum exactly the unit's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge

from dptrain.dp import head as chunked_head
from dptrain.dp import layers
from dptrain.dp.loss import IGNORE_INDEX, per_example_loss
from dptrain.dp.phases import phase
from dptrain.errors import UserError
from dptrain.privacy.mechanism import Mechanism, add_gaussian_noise, clip_coefficients

Noise = Callable[[torch.Size, torch.device, torch.dtype], torch.Tensor]


@dataclass
class EngineStats:
    """Counts since the last `reset_stats`. Derived from private data: never log them un-noised."""
    examples: int = 0   # examples with weight > 0
    clipped: int = 0    # of those, examples whose gradient norm exceeded max_grad_norm
    nonfinite: int = 0  # of those, examples whose gradient was not finite (contribution zeroed)


@dataclass
class _Group:
    """One trainable Parameter (a tied one appears once) and the module uses that produce it."""
    name: str
    param: nn.Parameter
    form: str                                        # "outer" or "vector"
    uses: list[tuple[nn.Module, Callable]]


class DPEngine:
    """Per-example clipped gradient sums and noise for a model of supported layers.

    `norm_method` picks how outer-product layers take norms: "auto" (per layer, by cost), or
    "ghost" / "instantiate" everywhere (embeddings always ghost) for tests and benchmarks.

    Raises UserError at construction, naming the module, for any trainable parameter held by a
    module the engine has no exact rule for. Nothing is skipped silently.
    """

    def __init__(self, model: nn.Module, max_grad_norm: float, norm_method: str = "auto"):
        if norm_method not in ("auto", "ghost", "instantiate"):
            raise UserError(f"norm_method must be auto, ghost or instantiate, got {norm_method!r}")
        self.norm_method = norm_method
        if not (isinstance(max_grad_norm, (int, float)) and math.isfinite(max_grad_norm) and max_grad_norm > 0):
            raise UserError(f"max_grad_norm must be a positive finite number, got {max_grad_norm!r}")
        self.model = model
        self.max_grad_norm = float(max_grad_norm)
        self._groups = _build_groups(model)
        self._calls: dict[nn.Module, list[layers.Call]] = {}
        self._capturing = False
        self._round_inputs: torch.dtype | None = None
        self._noised = False
        self._normalized = False
        self._counts = torch.zeros(3, dtype=torch.long)
        # Per-example losses of the last micro-batch: private data, for `private/` metrics only.
        self.last_losses: torch.Tensor | None = None
        self._hooked = {m for g in self._groups for m, _ in g.uses}
        self._handles = [m.register_forward_hook(self._record) for m in self._hooked]

    # -- public API -----------------------------------------------------------------------------
    @property
    def parameters(self) -> list[nn.Parameter]:
        """Every trainable parameter, each once (a tied weight is one entry)."""
        return [g.param for g in self._groups]

    @property
    def stats(self) -> EngineStats:
        examples, clipped, nonfinite = (int(x) for x in self._counts.tolist())
        return EngineStats(examples, clipped, nonfinite)

    def reset_stats(self) -> EngineStats:
        stats = self.stats
        self._counts = torch.zeros_like(self._counts)
        return stats

    def clipped_grad_sum(self, inputs: torch.Tensor, targets: torch.Tensor,
                         weights: torch.Tensor | None = None, accumulate: bool = True,
                         unit_size: int = 1) -> torch.Tensor:
        """Add sum_i w_i min(1, C/||g_i||) g_i to each parameter's .grad; return ||g_i|| [B].

        `unit_size=k`: example i is the unit of rows i*k .. i*k+k-1 (B a multiple of k), g_i the
        gradient of the sum of their losses; `weights` and the returned norms are then [B/k].
        The sum, not the mean: a unit's loss then does not depend on how many of its sequences
        were drawn (a mean would reweight every sequence by that data-dependent count), a unit of
        one sequence is exactly a sequence-level example, and a padding row (all targets
        ignored) adds nothing to its unit.

        Norms are float32 (float64 for a float64 model). An example whose gradient is not finite
        contributes nothing and is counted in `stats.nonfinite`; the call never fails on it.
        `accumulate=False` only measures the norms (for callers that form the clipped sum
        themselves, e.g. a second backward of sum_i c_i L_i through sharded parameters).
        """
        self._rearm_if_cleared()
        if self._noised or self._normalized:
            raise RuntimeError("gradients of this step were already noised or normalized; "
                               "call zero_grad() before accumulating the next step")
        fake = layers.is_fake(inputs)
        if int(unit_size) != unit_size or unit_size < 1 or inputs.shape[0] % unit_size:
            raise UserError(f"unit_size must be a positive integer dividing the {inputs.shape[0]} rows, "
                            f"got {unit_size}")
        rows = _check_batch(inputs, targets, weights if unit_size == 1 else None, check_values=not fake)
        batch = rows // unit_size
        if unit_size > 1 and weights is not None:
            _check_weights(weights, batch, check_values=not fake)
        if not torch.is_grad_enabled():
            raise RuntimeError("clipped_grad_sum needs autograd enabled (it was called under no_grad)")
        device = self._groups[0].param.device
        prec = _precision(self._groups, device)
        acc_dtype = prec.acc

        self._calls = {}
        self._round_inputs = prec.operand if prec.mixed else None
        self._capturing = True
        try:
            with phase("forward"):
                losses, head = self._losses(inputs, targets)
        finally:
            self._capturing = False
        try:
            calls = [c for cs in self._calls.values() for c in cs]
            for c in calls:
                if c.inp.shape[0] != rows:
                    raise RuntimeError(f"a hooked module saw a leading dimension of {c.inp.shape[0]}, "
                                       f"not the batch size {rows}: modules must be batch-first")
            # Gradient edges, not the outputs themselves, so outputs nothing else saved are freed.
            edges = [get_gradient_edge(c.out) for c in calls]
            shapes = [(c.out.shape, c.out.dtype) for c in calls]
            for c in calls:
                c.out = None
            with phase("backward"):
                grads = torch.autograd.grad(losses.sum(), edges, allow_unused=True)
            del edges
            for c, g, (shape, dtype) in zip(calls, grads, shapes):
                c.grad = torch.zeros(shape, dtype=dtype, device=device) if g is None else g
            del grads
            if head is not None:  # the chunked head kept its input and output-gradient itself
                self._calls[self.model.lm_head] = [layers.Call(head["input"], None, head.pop("output_grad"))]
            if unit_size > 1:  # each unit's rows as one example of k*T tokens
                for c in (c for cs in self._calls.values() for c in cs):
                    c.inp, c.grad = _unit_view(c.inp, unit_size), _unit_view(c.grad, unit_size)
                losses = losses.view(batch, unit_size).sum(1)

            # Autocast off: every matmul below states its precision (`layers.Precision`).
            with torch.autocast(device.type, enabled=False):
                with phase("norms"):
                    built = [self._build(g, prec) for g in self._groups]
                cache = layers.GramCache()
                ghost = self._ghost_choice(built)
                sq = torch.zeros(batch, dtype=acc_dtype, device=device)
                for i, (group, data) in enumerate(zip(self._groups, built)):
                    with phase(f"norms:{group.name}"):
                        sq = sq + self._sq_norms(group, data, ghost.get(i), prec, cache)
                    cache.keep_only([f.right for later in built[i + 1:]
                                     if isinstance(later, list) for f in later])
                del cache
                norms = sq.sqrt()
                w = (torch.ones(batch, dtype=acc_dtype, device=device) if weights is None
                     else weights.to(device=device, dtype=acc_dtype))
                # a non-finite loss makes the example's norm non-finite too: clipped to nothing
                norms = torch.where(torch.isfinite(losses.detach().to(acc_dtype)), norms,
                                    torch.full((), math.nan, dtype=acc_dtype, device=device))
                coef, finite = clip_coefficients(norms, w, self.max_grad_norm)
                # Fake tensors (`dptrain cost`) hold no values: take the all-finite path.
                bad = None if fake or bool(finite.all()) else ~finite
                for group, data in zip(self._groups, built if accumulate else ()):
                    if data is None or (isinstance(data, list) and not data):
                        continue  # not used in this forward: no gradient to add
                    with phase("clipped sum"):
                        if group.form == "outer":
                            layers.add_outer_clipped_sum(group.param, data, coef, bad, prec)
                        else:
                            layers.add_vector_clipped_sum(group.param, data, coef, bad)

            self.last_losses = losses.detach()
            if not fake:
                real = w > 0
                self._counts += torch.stack([real.sum(), (real & finite & (norms > self.max_grad_norm)).sum(),
                                             (real & ~finite).sum()]).cpu()
            return norms.detach().to(acc_dtype)
        finally:
            self._calls = {}

    def add_noise(self, noise_multiplier: float, noise: Noise) -> None:
        """Add noise_multiplier * C * z, z ~ N(0, 1) i.i.d., to every .grad element, once per step."""
        add_gaussian_noise(self._fresh_grads(), noise_multiplier * self.max_grad_norm, noise)
        self._noised = True

    def normalize(self, expected_batch_size: float) -> None:
        """Divide every .grad by the EXPECTED logical batch size (the realised one leaks it)."""
        if not (math.isfinite(expected_batch_size) and expected_batch_size > 0):
            raise UserError(f"expected_batch_size must be positive, got {expected_batch_size!r}")
        if self._normalized:
            raise RuntimeError("gradients were already normalized in this step")
        for p in self.parameters:
            if p.grad is not None:
                p.grad.div_(expected_batch_size)
        self._normalized = True

    def privatize(self, mechanism: Mechanism, noise: Noise | None,
                  local: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """The step's private gradient, in place: `mechanism.privatize` on every clipped sum.

        `noise` None: this process adds no noise (another rank adds it to the same sum). `local`
        maps a .grad to the part this process owns (an FSDP shard); default, the whole of it.
        """
        if mechanism.max_grad_norm != self.max_grad_norm:
            raise RuntimeError(f"the mechanism clips at {mechanism.max_grad_norm}, the engine at {self.max_grad_norm}")
        grads = self._fresh_grads()
        mechanism.privatize([g if local is None else local(g) for g in grads], noise)
        self._noised = self._normalized = True

    def _fresh_grads(self) -> list[torch.Tensor]:
        """Every parameter's .grad (zeros for one no example touched: it still gets its noise),
        refusing a step whose gradients were already noised or normalized."""
        self._rearm_if_cleared()
        if self._noised:
            raise RuntimeError("noise was already added in this step; call zero_grad() first")
        if self._normalized:
            raise RuntimeError("add noise before normalize(), to the clipped sum")
        for p in self.parameters:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        return [p.grad for p in self.parameters]

    def zero_grad(self) -> None:
        """Start a new logical step: drop the gradients and re-arm add_noise / normalize."""
        for p in self.parameters:
            p.grad = None
        self._noised = False
        self._normalized = False

    def remove(self) -> None:
        """Remove the forward hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []

    # -- internals ------------------------------------------------------------------------------
    def _rearm_if_cleared(self) -> None:
        """`optimizer.zero_grad()` (set_to_none) also starts a new step: every .grad is None."""
        if (self._noised or self._normalized) and all(p.grad is None for p in self.parameters):
            self._noised = self._normalized = False

    def _losses(self, inputs, targets) -> tuple[torch.Tensor, dict | None]:
        """Per-example losses; for a Decoder through the chunked head (`dptrain.dp.head`), which
        hands back the head's input and output-gradient in the returned dict."""
        if not chunked_head.supports_chunked_head(self.model):
            return per_example_loss(self.model(inputs), targets), None
        lm_head = self.model.lm_head
        keep = {} if lm_head in self._hooked else None

        def head(hidden):
            if keep is not None:
                kept = hidden.detach()
                keep["input"] = kept if self._round_inputs is None else kept.to(self._round_inputs)
            return chunked_head.head_loss(hidden, lm_head.weight.detach(), targets,
                                          self.model.cfg.final_logit_softcapping, keep=keep)
        return self.model(inputs, head=head), keep

    def _record(self, module: nn.Module, args, output) -> None:
        if not self._capturing:
            return
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            raise RuntimeError(f"hooked module {type(module).__name__} produced an output without grad")
        inp = args[0].detach()
        if self._round_inputs is not None and isinstance(module, nn.Linear) and inp.is_floating_point():
            # Autocast feeds a Linear the bf16 rounding of its input: keep that, not a float32 copy.
            inp = inp.to(self._round_inputs)
        self._calls.setdefault(module, []).append(layers.Call(inp=inp, out=output))

    def _build(self, group: _Group, prec: layers.Precision):
        items = [(m, fn) for m, fn in group.uses if m in self._calls]
        if group.form == "outer":
            factors = [fn(m, self._calls[m]) for m, fn in items]
            if prec.mixed:  # round once, so the norms and the clipped sum see the same operands
                factors = [layers.Factor(f.left if f.onehot else f.left.to(prec.operand),
                                         f.right.to(prec.operand), f.onehot) for f in factors]
            return factors
        vectors = [fn(m, self._calls[m], prec.acc) for m, fn in items]
        return sum(vectors) if vectors else None

    def _ghost_choice(self, built) -> dict[int, bool]:
        """Index of each outer-product group used in this forward -> ghost norm (else instantiate)."""
        outer = [i for i, (g, data) in enumerate(zip(self._groups, built)) if g.form == "outer" and data]
        if self.norm_method == "auto":
            return dict(zip(outer, layers.choose_ghost([built[i] for i in outer])))
        # Forced: embeddings still take the ghost norm (their gradient is V x d per example).
        return {i: self.norm_method == "ghost" or any(f.onehot for f in built[i]) for i in outer}

    def _sq_norms(self, group: _Group, data, ghost: bool | None, prec, cache) -> torch.Tensor | float:
        if data is None or (isinstance(data, list) and not data):  # not used in this forward
            return 0.0
        if group.form == "vector":
            return data.square().reshape(data.shape[0], -1).sum(1)
        if ghost:
            return layers.ghost_sq_norms(data, prec, cache)
        return layers.instantiated_sq_norms(data, prec)


def _precision(groups: list[_Group], device: torch.device) -> layers.Precision:
    """float64 / float32 models: exact in their dtype. bf16 / fp16 (autocast or weights): those
    operands, float32 sums."""
    dtypes = {g.param.dtype for g in groups}
    if torch.float64 in dtypes:
        return layers.Precision(torch.float64, torch.float64)
    low = dtypes & {torch.bfloat16, torch.float16}
    if torch.is_autocast_enabled(device.type):
        low = {torch.get_autocast_dtype(device.type)}
    return layers.Precision(low.pop() if low else torch.float32, torch.float32)


def _check_batch(inputs, targets, weights, check_values: bool = True) -> int:
    if inputs.dim() != 2 or targets.shape != inputs.shape:
        raise UserError(f"inputs and targets must both be [B, T]; got {tuple(inputs.shape)} "
                        f"and {tuple(targets.shape)}")
    if inputs.dtype != torch.long or targets.dtype != torch.long:
        raise UserError("inputs and targets must be integer (torch.long) tensors")
    if check_values and ((targets < 0) & (targets != IGNORE_INDEX)).any():
        raise UserError(f"targets must be token ids or {IGNORE_INDEX} (ignored position)")
    batch = inputs.shape[0]
    if weights is not None:
        _check_weights(weights, batch, check_values)
    return batch


def _check_weights(weights: torch.Tensor, batch: int, check_values: bool) -> None:
    if weights.shape != (batch,):
        raise UserError(f"weights must have shape [{batch}], got {tuple(weights.shape)}")
    if check_values and not (torch.isfinite(weights).all() and (weights >= 0).all()):
        raise UserError("weights must be finite and >= 0")


def _unit_view(x: torch.Tensor, k: int) -> torch.Tensor:
    """[B, T, ...] -> [B/k, k*T, ...]: each k consecutive rows' tokens become one example's."""
    return x.reshape(x.shape[0] // k, k * x.shape[1], *x.shape[2:])


def _build_groups(model: nn.Module) -> list[_Group]:
    """Map each trainable Parameter to its module uses; raise on anything without a rule."""
    by_param: dict[int, _Group] = {}
    for path, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            where = f"{path or '<root>'}.{pname}"
            role = layers.find_role(module, pname)
            if role is None:
                raise UserError(f"DP engine has no per-example gradient rule for parameter '{where}' "
                                f"of module '{path or '<root>'}' ({type(module).__name__})")
            why = layers.check_module_options(module)
            if why:
                raise UserError(f"DP engine cannot handle module '{path}' ({type(module).__name__}): {why}")
            form, builder = role
            group = by_param.setdefault(id(param), _Group(where, param, form, []))
            if group.form != form:
                raise UserError(f"parameter '{group.name}' is shared as '{where}' in a way the DP engine "
                                "cannot combine exactly")
            group.uses.append((module, builder))
    if not by_param:
        raise UserError("model has no trainable parameters")
    return list(by_param.values())


def clipped_grad_sum(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                     max_grad_norm: float, weights: torch.Tensor | None = None,
                     unit_size: int = 1) -> torch.Tensor:
    """One-shot form of `DPEngine.clipped_grad_sum` (installs and removes the hooks)."""
    engine = DPEngine(model, max_grad_norm)
    try:
        return engine.clipped_grad_sum(inputs, targets, weights, unit_size=unit_size)
    finally:
        engine.remove()
