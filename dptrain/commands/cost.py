"""`dptrain cost CONFIG`: counted flops and peak memory of one micro-batch step, non-private,
dptrain's DP step and Opacus ghost clipping, on fake tensors (no memory allocated, any config)."""
from __future__ import annotations

import argparse
import json


def register(sub) -> None:
    parser = sub.add_parser("cost", help="counted flops and memory of a training step (no GPU needed)",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("config", help="model config YAML")
    parser.add_argument("--seq-len", type=int, default=None, help="defaults to the config's max_seq_len")
    parser.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch step")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="bfloat16 = autocast over float32 weights")
    parser.add_argument("--gpu-memory", type=float, default=80.0,
                        help="GiB of accelerator memory, for the largest micro-batch that fits")
    parser.add_argument("--bands", type=int, default=1,
                        help="privacy.bands of BandMF: b-1 float32 noise buffers the size of the model, "
                             "kept by the process that adds the noise (1: DP-SGD, none)")
    parser.add_argument("--buffers", type=int, default=0,
                        help="privacy.buffers of BLT: that many float32 noise buffers the size of the model "
                             "(0: none; not with --bands)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def measure(args) -> dict:
    from dptrain.dp.cost import (count_step, largest_micro_batch, opacus_ghost_flops, parameter_counts,
                                 static_bytes)
    from dptrain.errors import UserError
    from dptrain.model import DecoderConfig

    cfg = DecoderConfig.from_yaml(args.config)
    seq_len = args.seq_len or cfg.max_seq_len
    if not 1 <= seq_len <= cfg.max_seq_len:
        raise UserError(f"--seq-len must be between 1 and the config's max_seq_len {cfg.max_seq_len}")
    if args.micro_batch < 1 or args.gpu_memory <= 0 or args.bands < 1 or args.buffers < 0:
        raise UserError("--micro-batch, --gpu-memory and --bands must be positive, --buffers at least 0")
    if args.bands > 1 and args.buffers:
        raise UserError("--bands (BandMF) and --buffers (BLT) are two mechanisms: give one")
    buffers = 4 * (args.bands - 1 + args.buffers) * parameter_counts(cfg)["total"]
    result = {"config": args.config, "seq_len": seq_len, "micro_batch": args.micro_batch,
              "dtype": args.dtype, "gpu_memory_bytes": args.gpu_memory * 2**30,
              "static_bytes": static_bytes(cfg), "bands": args.bands, "buffers": args.buffers,
              "noise_buffer_bytes": buffers, "flops": {}, "flops_by_part": {}, "peak_bytes": {},
              "peak_phase": {}, "peak_bytes_per_sequence": {}, "largest_micro_batch": {}}
    counts = {}
    for method in ("nonprivate", "dptrain"):
        by_batch = {b: count_step(cfg, method, b, seq_len, args.dtype) for b in {1, 2, args.micro_batch}}
        main = counts[method] = by_batch[args.micro_batch]
        result["flops"][method] = main.total_flops
        result["flops_by_part"][method] = dict(main.flops)
        result["peak_bytes"][method] = main.peak_bytes
        result["peak_phase"][method] = main.peak_phase
        result["peak_bytes_per_sequence"][method] = by_batch[2].peak_bytes - by_batch[1].peak_bytes
        result["largest_micro_batch"][method] = largest_micro_batch(
            by_batch[1], by_batch[2], cfg, args.gpu_memory * 2**30 - (buffers if method == "dptrain" else 0))
    opacus = opacus_ghost_flops(cfg, args.micro_batch, seq_len, counts["nonprivate"])
    result["flops"]["opacus_ghost"] = sum(opacus.values())
    result["flops_by_part"]["opacus_ghost"] = opacus
    return result


def run(args) -> int:
    result = measure(args)
    if args.json:
        print(json.dumps(result))
        return 0
    flops, parts = result["flops"], result["flops_by_part"]
    base = flops["nonprivate"]
    print(f"{result['config']}: micro-batch {result['micro_batch']} x {result['seq_len']} tokens, "
          f"{result['dtype']}; matmul flops counted on fake tensors (torch.utils.flop_counter)")
    print(f"{'method':14s} {'flops':>11s} {'vs non-private':>15s} {'peak GiB':>9s} {'GiB/seq':>8s} "
          f"{'fits':>5s}")
    for method in ("nonprivate", "dptrain", "opacus_ghost"):
        peak = result["peak_bytes"].get(method)
        per_seq = result["peak_bytes_per_sequence"].get(method)
        fits = result["largest_micro_batch"].get(method)
        cells = [f"{peak / 2**30:9.2f}" if peak is not None else f"{'-':>9s}",
                 f"{per_seq / 2**30:8.2f}" if per_seq is not None else f"{'-':>8s}",
                 f"{fits:5d}" if fits is not None else f"{'-':>5s}"]
        print(f"{method:14s} {flops[method]:11.4g} {flops[method] / base:14.3f}x {' '.join(cells)}")
    for method in ("nonprivate", "dptrain", "opacus_ghost"):
        shares = ", ".join(f"{part} {value / base:.1%}" for part, value in parts[method].items())
        print(f"  {method} parts (share of non-private): {shares}")
    print(f"peak = tensors the step holds beyond weights, .grad and optimizer state (peak phase: "
          f"non-private {result['peak_phase']['nonprivate']}, dptrain {result['peak_phase']['dptrain']}); "
          f"fits = largest micro-batch within {result['gpu_memory_bytes'] / 2**30:g} GiB after "
          f"{result['static_bytes'] / 2**30:.2f} GiB of float32 weights, grads and Adam moments")
    if result["bands"] > 1:
        print(f"bandmf, {result['bands']} bands: {result['noise_buffer_bytes'] / 2**30:.2f} GiB of noise buffers "
              f"({result['bands'] - 1} x the float32 weights), counted in dptrain's fit")
    if result["buffers"]:
        print(f"blt, {result['buffers']} buffers: {result['noise_buffer_bytes'] / 2**30:.2f} GiB of noise buffers "
              f"({result['buffers']} x the float32 weights), counted in dptrain's fit")
    print("opacus_ghost: flops by formula (dptrain.dp.cost.opacus_ghost_flops); its memory is not counted")
    return 0
