"""`dptrain model info CONFIG`: size, training flops and memory of a model config."""
from __future__ import annotations


def register(sub) -> None:
    parser = sub.add_parser("model", help="inspect model configs")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    info = actions.add_parser("info", help="parameters, flops per token and memory of a config")
    info.add_argument("config", help="model config YAML")
    info.add_argument("--seq-len", type=int, default=None, help="defaults to the config's max_seq_len")
    info.set_defaults(func=run_info)


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T", "P", "E"):
        if abs(n) < 1000:
            return f"{n:.3g}{suffix}{unit}"
        n /= 1000
    return f"{n:.3g}Z{unit}"


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


def run_info(args) -> int:
    from dptrain.model import (DecoderConfig, attention_flops_per_token, parameter_counts,
                               training_flops_per_token)

    cfg = DecoderConfig.from_yaml(args.config)
    counts = parameter_counts(cfg)
    seq_len = args.seq_len or cfg.max_seq_len
    flops = training_flops_per_token(cfg, seq_len)
    total = counts["total"]
    kv = {1: "multi-query", cfg.num_heads: "multi-head"}.get(cfg.num_kv_heads, "grouped-query")
    print(f"config            {args.config}")
    print(f"layers            {cfg.num_layers} x (hidden {cfg.hidden_size}, mlp {cfg.intermediate_size}, "
          f"{cfg.num_heads} heads of {cfg.head_dim}, {cfg.num_kv_heads} KV ({kv}))")
    print(f"parameters        {_human(total)} ({total:,})")
    print(f"  embedding       {_human(counts['embedding'])} ({counts['embedding']:,})"
          f"{' tied with the output head' if cfg.tie_embeddings else ''}")
    print(f"  non-embedding   {_human(counts['non_embedding'])} ({counts['non_embedding']:,})")
    print(f"training flops    {_human(flops)} per token at seq-len {seq_len} "
          f"(6N = {_human(flops - attention_flops_per_token(cfg, seq_len))}"
          f" + attention)")
    print(f"memory (weights)  float32 {_gib(4 * total)}, bfloat16 {_gib(2 * total)}")
    print(f"memory (training) {_gib(16 * total)}: float32 weights, gradients and two Adam moments "
          f"(activations extra)")
    return 0
