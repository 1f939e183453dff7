"""Throughput of a sharded private step against a sharded non-private one, in the same processes.

    torchrun --standalone --nproc-per-node 8 -m dptrain.distributed.benchmark \\
        --config configs/model/vaultgemma-1b.yaml --seq-len 1024 --micro-batch 4 --dtype bfloat16

Both methods run on the same FSDP2-sharded model and random tokens (no private data is read):
`nonprivate` is forward + backward of the mean loss (FSDP reduce-scatters it) and the optimizer
step; `dp-fsdp` is one micro-batch of the two-pass clipped sum, the per-shard noise and the
optimizer step that `runtime.parallel=fsdp` runs; `dp-ddp` is the same on a replicated copy
(`runtime.parallel=ddp`: the one-pass engine and an all-reduce), the cost the second pass and the
sharding are measured against. Methods alternate round-robin so a busy machine slows both alike;
rank 0 prints medians, the DP / non-private time ratio and, on CUDA, peak memory per rank.
"""
from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from dptrain.distributed.parallel import DataParallel, make_parallel
from dptrain.dp import DPEngine
from dptrain.dp.benchmark import timed_call
from dptrain.model import Decoder, DecoderConfig
from dptrain.privacy.mechanism import Mechanism
from dptrain.privacy.noise import NoiseSource
from dptrain.progress import progress_bar


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", required=True, help="model config YAML")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=4, help="sequences per rank")
    parser.add_argument("--steps", type=int, default=5, help="timed repetitions per method (median)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--noise-multiplier", type=float, default=1.0)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    parallel = make_parallel("fsdp", torch.device(args.device))
    device, world = parallel.device, parallel.env.world_size
    cfg = DecoderConfig.from_yaml(args.config)
    torch.manual_seed(0)
    replica = Decoder(cfg).to(device)
    replicated = DataParallel(parallel.env, device)
    replica_engine = DPEngine(replica, max_grad_norm=1.0)
    replica_optimizer = torch.optim.AdamW(replica.parameters(), lr=1e-4)
    torch.manual_seed(0)
    model = parallel.prepare(Decoder(cfg).to(device))
    engine = DPEngine(model, max_grad_norm=1.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    noise = NoiseSource(1)
    # an expected batch of the global micro-batch (the timing does not depend on the sampling)
    mechanism = Mechanism(args.noise_multiplier, 1.0, args.micro_batch * world, args.micro_batch * world)
    gen = torch.Generator().manual_seed(1 + parallel.env.rank)
    tokens = torch.randint(0, cfg.vocab_size, (args.micro_batch, args.seq_len + 1), generator=gen).to(device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    weights = torch.ones(args.micro_batch, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

    def nonprivate() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            logits = model(inputs)
        F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()).backward()
        optimizer.step()

    step = iter(range(10**9))

    def dp() -> None:
        engine.zero_grad()
        with autocast:
            parallel.clipped_grad_sum(engine, inputs, targets, weights)
        parallel.privatize(engine, mechanism, noise, next(step))
        optimizer.step()

    def dp_ddp() -> None:
        replica_engine.zero_grad()
        with autocast:
            replicated.clipped_grad_sum(replica_engine, inputs, targets, weights)
        replicated.privatize(replica_engine, mechanism, noise, 0)
        replica_optimizer.step()

    methods = {"nonprivate": nonprivate, "dp-fsdp": dp, "dp-ddp": dp_ddp}
    times: dict[str, list[float]] = {name: [] for name in methods}
    peak: dict[str, float] = {}
    for name, fn in methods.items():  # warm-up, and peak memory per method
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            peak[name] = torch.cuda.max_memory_allocated(device) / 2**30
    for _ in progress_bar(range(args.steps), desc="timing", disable=not parallel.is_main):
        for name, fn in methods.items():
            parallel.barrier()
            times[name].append(timed_call(fn, device))
    if parallel.is_main:
        tokens_per_step = args.micro_batch * args.seq_len * world
        print(f"{world} x {device.type}, {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
              f"micro-batch {args.micro_batch} x {args.seq_len} tokens per rank, {args.dtype}")
        base = statistics.median(times["nonprivate"])
        for name, ts in times.items():
            med = statistics.median(ts)
            mem = f", peak {peak[name]:.2f} GiB/rank" if name in peak else ""
            print(f"  {name:10s} {med * 1e3:9.1f} ms/step  {tokens_per_step / med:10.0f} tok/s  "
                  f"x{med / base:.2f} vs nonprivate{mem}")
    parallel.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
