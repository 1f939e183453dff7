#!/usr/bin/env bash
# The engine's GPU checks in one run (about 8 minutes at most on one 80-141 GB card):
#   1. the GPU-marked tests (bf16 norms and clipped sums against float64 included),
#   2. the largest micro-batch that fits, from `dptrain cost` for this card's memory,
#   3. `dptrain bench` of VaultGemma 1B at T = 1024 in bf16: non-private, dptrain and Opacus
#      ghost clipping, halving the micro-batch until a run fits in memory and time.
# Everything lands in one folder (default benchmarks/gpu-results/<UTC time>): JSON and summary.md.
# Usage: benchmarks/gpu.sh [OUT_DIR]     Exit status 3: no CUDA device.
# GPU_SH_DRY=1 runs the same plumbing on the CPU with the tiny config (a check of the script only).
set -euo pipefail

cd "$(dirname "$0")/.."
export PYTHONPATH="${PWD}${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
BUDGET_S=480
START=$SECONDS
if [ "${GPU_SH_DRY:-0}" = 1 ]; then
    CONFIG=configs/model/tiny.yaml SEQ_LEN=32 DEVICE=cpu GIB=2 TESTS=(tests/test_dp_precision.py)
else
    CONFIG=configs/model/vaultgemma-1b.yaml SEQ_LEN=1024 DEVICE=cuda GIB="" TESTS=(-m gpu tests)
    if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
        echo "gpu.sh: no CUDA device visible to torch; nothing was run" >&2
        exit 3
    fi
fi

OUT="${1:-benchmarks/gpu-results/$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$OUT"
left() { echo $((BUDGET_S - (SECONDS - START))); }

"$PY" - > "$OUT/device.json" <<'PYEOF'
import json, datetime, torch
cuda = torch.cuda.is_available()
p = torch.cuda.get_device_properties(0) if cuda else None
print(json.dumps({"device": p.name if cuda else "cpu", "memory_bytes": p.total_memory if cuda else 0,
                  "torch": torch.__version__, "cuda": torch.version.cuda,
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat()}))
PYEOF

echo "== GPU-marked tests"
set +e
timeout 150 "$PY" -m pytest -q "${TESTS[@]}" --junitxml="$OUT/gpu-tests.xml" > "$OUT/gpu-tests.txt" 2>&1
TESTS_RC=$?
set -e
tail -n 3 "$OUT/gpu-tests.txt"

echo "== largest micro-batch that fits (counted on fake tensors)"
if [ -z "$GIB" ]; then
    GIB=$("$PY" -c 'import torch; print(int(0.92 * torch.cuda.get_device_properties(0).total_memory / 2**30))')
fi
"$PY" -m dptrain cost "$CONFIG" --seq-len "$SEQ_LEN" --dtype bfloat16 --gpu-memory "$GIB" --json > "$OUT/cost.json"
MICRO=$("$PY" -c 'import json, sys; print(max(1, min(32, json.load(open(sys.argv[1]))["largest_micro_batch"]["dptrain"])))' "$OUT/cost.json")

echo "== bench, $CONFIG, T = $SEQ_LEN, bf16, starting at micro-batch $MICRO"
BENCH_RC=1
while [ "$MICRO" -ge 1 ] && [ "$(left)" -gt 60 ]; do
    set +e
    timeout "$(left)" "$PY" -m dptrain bench --config "$CONFIG" --seq-len "$SEQ_LEN" --micro-batch "$MICRO" \
        --device "$DEVICE" --dtype bfloat16 --steps 3 --methods nonprivate,dptrain,opacus-ghost \
        --json "$OUT/bench.json" > "$OUT/bench-b$MICRO.txt" 2>&1
    BENCH_RC=$?
    set -e
    [ "$BENCH_RC" -eq 0 ] && break
    echo "micro-batch $MICRO did not complete (exit $BENCH_RC, see $OUT/bench-b$MICRO.txt)"
    MICRO=$((MICRO / 2))
done

"$PY" - "$OUT" "$TESTS_RC" "$BENCH_RC" > "$OUT/summary.md" <<'PYEOF'
import json, pathlib, sys
out, tests_rc, bench_rc = pathlib.Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
dev = json.loads((out / "device.json").read_text())
cost = json.loads((out / "cost.json").read_text())
print(f"# GPU run: {dev['device']}, {dev['date'][:10]}\n")
print(f"torch {dev['torch']}, CUDA {dev['cuda']}, {dev['memory_bytes'] / 2**30:.0f} GiB\n")
print(f"- GPU-marked tests: {'passed' if tests_rc == 0 else f'FAILED (exit {tests_rc})'} (gpu-tests.txt)")
print(f"- counted: DP / non-private flops {cost['flops']['dptrain'] / cost['flops']['nonprivate']:.3f}, "
      f"largest micro-batch {cost['largest_micro_batch']}")
bench = out / "bench.json"
if bench_rc != 0 or not bench.exists():
    print(f"- bench: no run completed (exit {bench_rc})")
    sys.exit(0)
b = json.loads(bench.read_text())
t = b["seconds_per_step"]
tokens = b["micro_batch"] * b["seq_len"]
print(f"- bench: {b['config']}, micro-batch {b['micro_batch']} x {b['seq_len']}, {b['dtype']}, median of {b['steps']}\n")
print("| method | s/step | tokens/s | peak GiB | vs non-private |")
print("|---|---|---|---|---|")
for name, s in t.items():
    peak = b["peak_bytes"].get(name)
    print(f"| {name} | {s:.3f} | {tokens / s:.0f} | {peak / 2**30:.1f} | {s / t['nonprivate']:.2f}x |" if peak is not None
          else f"| {name} | {s:.3f} | {tokens / s:.0f} | - | {s / t['nonprivate']:.2f}x |")
if "opacus-ghost" in t:
    print(f"\nOpacus ghost / dptrain time: {t['opacus-ghost'] / t['dptrain']:.2f}")
PYEOF
cat "$OUT/summary.md"
echo "results in $OUT"
[ "$TESTS_RC" -eq 0 ] && [ "$BENCH_RC" -eq 0 ]
