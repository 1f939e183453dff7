"""The VaultGemma-style decoder: Gemma 2 without post-norms, multi-query attention by default.

Each layer is `h = x + attn(input_layernorm(x)); out = h + mlp(pre_feedforward_layernorm(h))`.
Module names follow Hugging Face's `VaultGemmaForCausalLM`, so export is a renaming by prefix.

Built for per-example gradient norms taken layer by layer: every trainable weight sits in an
`nn.Linear`, an `nn.Embedding` or an `RMSNorm`, none of them holds a buffer, and nothing mixes the
examples of a batch. A tied output head is an `nn.Linear` sharing the embedding's Parameter.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dptrain import configio
from dptrain.errors import UserError


@dataclass
class DecoderConfig:
    vocab_size: int = 256000
    hidden_size: int = 1152
    intermediate_size: int = 6912
    num_layers: int = 26
    num_heads: int = 4
    num_kv_heads: int = 1  # 1 = multi-query; num_heads = full multi-head; between = grouped
    head_dim: int = 256
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    query_pre_attn_scalar: float = 256.0
    attn_logit_softcapping: float | None = None  # None = off
    final_logit_softcapping: float | None = None
    tie_embeddings: bool = True
    initializer_range: float = 0.02

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        for name in ("attn_logit_softcapping", "final_logit_softcapping"):
            cap = getattr(self, name)
            if cap is not None and cap <= 0:
                raise ValueError(f"{name} must be positive or null, got {cap}")

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] = ()) -> "DecoderConfig":
        return configio.load(cls, path, overrides)

    def to_yaml(self, path: str | Path) -> None:
        configio.write_yaml(self, path)


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: the gain is (1 + w), w starts at zero; computed in float32.

    Under autocast the output is in the autocast dtype: the Linears it feeds would each cast it
    anyway, and autograd would keep one copy per Linear (three for q/k/v) instead of one."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        return (normed * (1.0 + self.weight.float())).to(dtype)


def rotary_tables(seq_len: int, head_dim: int, theta: float, device, dtype):
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    freqs = torch.arange(seq_len, dtype=torch.float32, device=device)[:, None] * inv_freq
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    return x if cap is None else torch.tanh(x / cap) * cap


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return self.o_proj(self.mix(self.q_proj(x), self.k_proj(x), self.v_proj(x), cos, sin))

    def mix(self, q, k, v, cos, sin) -> torch.Tensor:
        """Everything between the projections: parameter-free, so `Decoder.compile_mixers` may fuse it."""
        cfg = self.cfg
        b, t, _ = q.shape
        q = q.view(b, t, cfg.num_heads, cfg.head_dim).transpose(1, 2)
        k = k.view(b, t, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        v = v.view(b, t, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        scale = cfg.query_pre_attn_scalar ** -0.5
        if cfg.attn_logit_softcapping is None:
            out = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=scale, enable_gqa=cfg.num_kv_heads != cfg.num_heads)
        else:
            out = self._softcapped_attention(q, k, v, scale)
        return out.transpose(1, 2).reshape(b, t, cfg.num_heads * cfg.head_dim)

    def _softcapped_attention(self, q, k, v, scale):
        # Soft-capping sits between the score matmul and the softmax, where no fused kernel reaches.
        groups = self.cfg.num_heads // self.cfg.num_kv_heads
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        scores = softcap(torch.matmul(q, k.transpose(-1, -2)) * scale, self.cfg.attn_logit_softcapping)
        t = q.shape[-2]
        causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(weights, v)


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate(self.gate_proj(x), self.up_proj(x)))

    @staticmethod
    def gate(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return F.gelu(gate, approximate="tanh") * up


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return h + self.mlp(self.pre_feedforward_layernorm(h))


class Decoder(nn.Module):
    """`forward(input_ids[B, T]) -> logits[B, T, V]`, full causal attention over each row;
    `hidden(input_ids)` stops before the head."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.reset_parameters()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Gemma's initialisation: N(0, 0.02²) for every matrix, zero for every norm gain."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, self.cfg.initializer_range, generator=generator)
            elif isinstance(module, RMSNorm):
                module.weight.zero_()

    def forward(self, input_ids: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor] | None = None):
        """Logits, or `head(hidden states [B, T, d])` in their place: training takes its loss from
        the hidden states by chunks of tokens (`dptrain.dp.head`), never forming [B, T, V]. Called
        through forward, so wrappers' hooks (FSDP's unsharding) see the head's weight use."""
        h = self.hidden(input_ids)
        if head is not None:
            return head(h)
        return softcap(self.lm_head(h), self.cfg.final_logit_softcapping)

    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The final normed hidden states [B, T, d], what the head reads."""
        t = input_ids.shape[1]
        if t > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {t} tokens exceeds max_seq_len {self.cfg.max_seq_len}")
        x = self.embed_tokens(input_ids)
        x = x * torch.tensor(math.sqrt(self.cfg.hidden_size), dtype=x.dtype)
        cos, sin = rotary_tables(t, self.cfg.head_dim, self.cfg.rope_theta, x.device, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)

    def compile_mixers(self) -> None:
        """torch.compile the parameter-free parts of every layer (attention mixing, GeGLU gating).

        The layers holding weights stay eager on purpose: the DP engine reads their inputs and
        output-gradients through hooks and autograd edges that a compiled region would fuse away.
        """
        for layer in self.layers:
            layer.self_attn.mix = torch.compile(layer.self_attn.mix, dynamic=False)
            layer.mlp.gate = torch.compile(MLP.gate, dynamic=False)

    def unique_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict with a tied head's alias dropped, so each tensor is stored once."""
        state = self.state_dict()
        if self.cfg.tie_embeddings:
            state.pop("lm_head.weight")
        return state

    def load_unique_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load weights written by `unique_state_dict`, naming the first tensor that does not fit."""
        expected = self.unique_state_dict()
        for name in sorted(set(state) - set(expected)):
            raise UserError(f"checkpoint tensor '{name}' does not exist in this model config")
        for name, ref in expected.items():
            if name not in state:
                raise UserError(f"checkpoint lacks tensor '{name}'")
            if tuple(state[name].shape) != tuple(ref.shape):
                raise UserError(f"checkpoint tensor '{name}' has shape {tuple(state[name].shape)}, "
                                f"the config needs {tuple(ref.shape)}")
        with torch.no_grad():
            for name, ref in expected.items():
                ref.copy_(state[name])


def parameter_counts(cfg: DecoderConfig) -> dict[str, int]:
    """Parameters by role, from the config alone (no model is built)."""
    attn = cfg.hidden_size * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    mlp = 3 * cfg.hidden_size * cfg.intermediate_size
    norms = 2 * cfg.hidden_size
    non_embedding = cfg.num_layers * (attn + mlp + norms) + cfg.hidden_size
    embedding = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_embeddings else 2)
    return {"embedding": embedding, "non_embedding": non_embedding, "total": embedding + non_embedding}


def training_flops_per_token(cfg: DecoderConfig, seq_len: int | None = None) -> int:
    """6·N for the matmuls (output head included, embedding lookup excluded) plus attention.

    The attention term is PaLM's 12·L·H·Dh·T: QKᵀ and AV, forward and backward, without discounting
    the causal mask (the kernels compute most of the masked half anyway).
    """
    matmul_params = parameter_counts(cfg)["non_embedding"] + cfg.vocab_size * cfg.hidden_size
    return 6 * matmul_params + attention_flops_per_token(cfg, seq_len)


def attention_flops_per_token(cfg: DecoderConfig, seq_len: int | None = None) -> int:
    """The attention term of `training_flops_per_token`: 12·L·H·Dh·T."""
    return 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * (seq_len or cfg.max_seq_len)
