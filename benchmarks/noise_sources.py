"""Throughput of the keyed (Philox, from the run's secret) and the secure Gaussian noise sources (elements
per second, CPU).

    python benchmarks/noise_sources.py [--elements 4000000] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))
from dptrain.privacy.noise import NoiseSource  # noqa: E402


def best_rate(source: NoiseSource, elements: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        source((elements,), "cpu")
        best = min(best, time.perf_counter() - start)
    return elements / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, default=4_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.elements:,} float32 elements, best of {args.repeats}")
    keyed = best_rate(NoiseSource(0), args.elements, args.repeats)
    secure = best_rate(NoiseSource(0, secure=True), args.elements, args.repeats)
    print(f"keyed (numpy Philox stream)   {keyed:14,.0f} elements/s")
    print(f"secure (OS CSPRNG, 4-sum)     {secure:14,.0f} elements/s")
    print(f"secure / keyed time ratio     {keyed / secure:14.1f}x")


if __name__ == "__main__":
    main()
