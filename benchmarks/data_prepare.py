"""Throughput of `dptrain data prepare` next to raw SentencePiece encoding of the same text.

Generates about `--mb` MB of synthetic records (the demo generator), trains a tokenizer on the
demo's public text, then times, in this one process and on the same cores:
  raw       SentencePiece `encode(texts, return_type="numpy", num_threads=N)` (its fastest
            output) of the documents already in memory, in chunks of `--batch-docs`;
  pipeline  `prepare()` from the jsonl file: read via HF datasets, tokenize, pack, write, manifest.
Prints tokens/s of both and their ratio (the pipeline should stay within 1.5x of raw). The
one-time import of `datasets` (seconds) is done before timing: it does not grow with the data.

    python benchmarks/data_prepare.py --mb 100      (from the repository root)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import sentencepiece as spm

from dptrain.data import PackedDataset, prepare, train_tokenizer
from dptrain.data.demo import write_demo_corpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=100.0, help="size of the generated text")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--num-proc", type=int, default=os.cpu_count())
    parser.add_argument("--batch-docs", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--format", choices=("jsonl", "parquet"), default="jsonl",
                        help="file type the pipeline reads (parquet skips JSON parsing)")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        records = int(args.mb * 1e6 / 480)  # about 480 bytes of JSON per record
        t0 = time.perf_counter()
        paths = write_demo_corpus(work / "corpus", seed=0, num_records=records,
                                  num_public_paragraphs=20_000)
        size = paths["private"].stat().st_size
        print(f"generated {size / 1e6:.1f} MB, {records} records in {time.perf_counter() - t0:.1f} s")
        model = train_tokenizer([paths["public"]], args.vocab_size, work / "tok.model",
                                num_threads=args.num_proc)

        texts = [json.loads(line)["text"] for line in paths["private"].open(encoding="utf-8")]
        sp = spm.SentencePieceProcessor(model_file=str(model))
        source = paths["private"]
        if args.format == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            source = work / "private.parquet"
            pq.write_table(pa.table({"text": texts}), source)
        import datasets  # noqa: F401  (one-time import, kept out of the timing)

        def raw() -> int:
            tokens = 0
            for i in range(0, len(texts), args.batch_docs):
                ids = sp.encode(texts[i:i + args.batch_docs], return_type="numpy",
                                num_threads=args.num_proc)
                tokens += sum(map(len, ids))
            return tokens

        def pipeline() -> int:
            out = prepare([source], model, args.seq_len, work / "prepared",
                          num_proc=args.num_proc, batch_docs=args.batch_docs, progress=False)
            return PackedDataset(out).manifest["splits"]["train"]["num_tokens"]

        # Alternate the two and keep each one's best round: the cores may be shared.
        best = {}
        for _ in range(args.rounds):
            for name, fn in (("raw", raw), ("pipeline", pipeline)):
                wall, cpu = time.perf_counter(), time.process_time()
                tokens = fn()
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                if name not in best or wall < best[name][1]:
                    best[name] = (tokens, wall, cpu)

    print(f"machine   {platform.machine()}, {os.cpu_count()} cores, num_proc {args.num_proc}, "
          f"load average {os.getloadavg()[0]:.1f}, best of {args.rounds} rounds, input {args.format}")
    for name, (tokens, wall, cpu) in best.items():
        print(f"{name:<9} {tokens / wall / 1e6:6.2f} M tokens/s  ({tokens} tokens, {wall:.2f} s wall, "
              f"{cpu:.2f} s CPU)")
    (rt, rw, rc), (pt, pw, pc) = best["raw"], best["pipeline"]
    print(f"ratio     pipeline / raw: {pw / rw:.2f}x wall time, {pc / rc:.2f}x CPU time "
          f"(pipeline tokens include BOS/EOS; raw {rt}, pipeline {pt})")

if __name__ == "__main__":
    main()
