"""`dptrain bench`: one micro-batch step of non-private training, dptrain's DP engine, Opacus and the
naive per-example loop, on the same model and data in one process."""
from __future__ import annotations


def register(sub) -> None:
    parser = sub.add_parser("bench", help="time and memory of a DP step against baselines")
    parser.add_argument("--config", required=True, help="model config YAML")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5,
                        help="timed repetitions per method (median, min and max; the methods' order "
                             "rotates every repetition)")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads (default: 1 on cpu, torch's default on cuda); pinned so "
                             "timings do not swing with whatever else shares the cores")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="bfloat16 = autocast over float32 weights")
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--methods", default="nonprivate,dptrain,opacus-hooks,opacus-ghost,naive",
                        help="comma-separated subset to run; add dptrain-unit4 for user-level clipping "
                             "(units of 4 sequences, the same micro-batch)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="device peak for MFU (default: the dense bf16 peak of a known GPU; none on cpu)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the figures to this JSON file")
    parser.set_defaults(func=run)


def run(args) -> int:
    from dptrain.dp.benchmark import run_benchmark

    return run_benchmark(args)
