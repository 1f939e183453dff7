#!/usr/bin/env bash
# The engine's GPU checks in one run (about 8 minutes at most on one 80-141 GB card):
#   1. the GPU-marked tests (bf16 norms and clipped sums against float64 included),
#   2. the largest micro-batch that fits, from `dptrain cost` for this card's memory,
#   3. `dptrain bench` of VaultGemma 1B at T = 1024 in bf16, one method at a time (non-private,
#      dptrain, Opacus ghost clipping), each from its own largest micro-batch: an attempt that runs
#      out of memory or past its time box is retried at half the micro-batch.
# Every stage is time-boxed, and each method gets its share of what is left, so one hung or
# too-slow attempt cannot use up the window before the other methods are measured.
# Everything lands in one folder (default benchmarks/gpu-results/<UTC time>): JSON, attempts.tsv
# and summary.md (tokens/s, MFU, peak and reserved memory, min..max over steps).
# Usage: benchmarks/gpu.sh [OUT_DIR]     Exit status 3: no CUDA device.
# GPU_SH_DRY=1 runs the same plumbing on the CPU with the tiny config (a check of the script only).
# For that check: GPU_SH_ATTEMPT_S (seconds one bench attempt may take) and GPU_SH_STALL=METHOD:N
# (an attempt of METHOD above micro-batch N sleeps past its time box instead of running, as a run
# too slow for its box would) exercise the time box and the retry.
set -euo pipefail

cd "$(dirname "$0")/.."
export PYTHONPATH="${PWD}${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
BUDGET_S="${GPU_SH_BUDGET_S:-480}"
ATTEMPT_S="${GPU_SH_ATTEMPT_S:-150}"   # one bench attempt: model build, warm-up, steps, memory pass
MIN_ATTEMPT_S=20                      # a shorter box could not even build the 1B model
RESERVE_S=15                          # kept for the summary
METHODS=(nonprivate dptrain opacus-ghost)
START=$SECONDS
if [ "${GPU_SH_DRY:-0}" = 1 ]; then
    CONFIG=configs/model/tiny.yaml SEQ_LEN=32 DEVICE=cpu GIB=2 TESTS=(tests/test_layering.py)  # any quick file: the plumbing is checked
    MAX_MICRO=8 STEPS=2 MIN_ATTEMPT_S=1
else
    CONFIG=configs/model/vaultgemma-1b.yaml SEQ_LEN=1024 DEVICE=cuda GIB="" TESTS=(-m gpu tests)
    MAX_MICRO=32 STEPS=5
    if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
        echo "gpu.sh: no CUDA device visible to torch; nothing was run" >&2
        exit 3
    fi
fi

OUT="${1:-benchmarks/gpu-results/$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$OUT"
left() { echo $((BUDGET_S - (SECONDS - START))); }
smaller() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }

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
# one process (the project's addopts would start a worker per core, all on the one device)
timeout "$(smaller 150 "$(left)")" "$PY" -m pytest -q -o addopts=-ra "${TESTS[@]}" --junitxml="$OUT/gpu-tests.xml" \
    > "$OUT/gpu-tests.txt" 2>&1
TESTS_RC=$?
set -e
tail -n 3 "$OUT/gpu-tests.txt"

echo "== largest micro-batch that fits (counted on fake tensors)"
if [ -z "$GIB" ]; then
    GIB=$("$PY" -c 'import torch; print(int(0.92 * torch.cuda.get_device_properties(0).total_memory / 2**30))')
fi
set +e
timeout "$(smaller 60 "$(left)")" "$PY" -m dptrain cost "$CONFIG" --seq-len "$SEQ_LEN" --dtype bfloat16 \
    --gpu-memory "$GIB" --json > "$OUT/cost.json" 2> "$OUT/cost.txt"
COST_RC=$?
set -e
# Each method starts from its own count (Opacus ghost is not counted: it starts from dptrain's);
# without a count, from the cap.
start_micro() {
    "$PY" - "$OUT/cost.json" "$1" "$MAX_MICRO" <<'PYEOF'
import json, sys
path, method, cap = sys.argv[1], sys.argv[2], int(sys.argv[3])
try:
    counts = json.load(open(path))["largest_micro_batch"]
except (OSError, ValueError, KeyError):
    counts = {}
print(max(1, min(cap, counts.get(method, counts.get("dptrain", cap)))))
PYEOF
}

echo "== bench, $CONFIG, T = $SEQ_LEN, bf16, one method at a time"
printf 'method\tmicro_batch\texit\tseconds\n' > "$OUT/attempts.tsv"
BENCH_RC=0
for i in "${!METHODS[@]}"; do
    METHOD=${METHODS[$i]}
    SHARE=$(( ($(left) - RESERVE_S) / (${#METHODS[@]} - i) ))   # this method's part of what is left
    DEADLINE=$((SECONDS + SHARE))
    MICRO=$(start_micro "$METHOD")
    DONE=0
    while [ "$MICRO" -ge 1 ]; do
        BOX=$(smaller "$ATTEMPT_S" $((DEADLINE - SECONDS)))
        [ "$BOX" -ge "$MIN_ATTEMPT_S" ] || break
        STALL="${GPU_SH_STALL:-}"
        if [ "${STALL%%:*}" = "$METHOD" ] && [ "$MICRO" -gt "${STALL#*:}" ]; then
            CMD=(sleep 3600)   # the dry run's stand-in for an attempt too slow for its box
        else
            CMD=("$PY" -m dptrain bench --config "$CONFIG" --seq-len "$SEQ_LEN" --micro-batch "$MICRO"
                 --device "$DEVICE" --dtype bfloat16 --steps "$STEPS" --methods "$METHOD"
                 --json "$OUT/bench-$METHOD.json")
        fi
        T0=$SECONDS
        set +e
        timeout "$BOX" "${CMD[@]}" > "$OUT/bench-$METHOD-b$MICRO.txt" 2>&1
        RC=$?
        set -e
        printf '%s\t%s\t%s\t%s\n' "$METHOD" "$MICRO" "$RC" $((SECONDS - T0)) >> "$OUT/attempts.tsv"
        if [ "$RC" -eq 0 ]; then
            DONE=1
            break
        fi
        WHY=$([ "$RC" -eq 124 ] && echo "timed out after ${BOX} s" || echo "failed, exit $RC")
        echo "$METHOD at micro-batch $MICRO: $WHY (see $OUT/bench-$METHOD-b$MICRO.txt); retrying at $((MICRO / 2))"
        MICRO=$((MICRO / 2))
    done
    if [ "$DONE" -eq 1 ]; then
        echo "$METHOD: measured at micro-batch $MICRO"
    else
        echo "$METHOD: no attempt completed in its ${SHARE} s"
        BENCH_RC=1
    fi
done

"$PY" - "$OUT" "$TESTS_RC" "$COST_RC" "${METHODS[@]}" > "$OUT/summary.md" <<'PYEOF'
import csv, json, pathlib, sys
out, tests_rc, cost_rc, methods = pathlib.Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
dev = json.loads((out / "device.json").read_text())
print(f"# GPU run: {dev['device']}, {dev['date'][:10]}\n")
print(f"torch {dev['torch']}, CUDA {dev['cuda']}, {dev['memory_bytes'] / 2**30:.0f} GiB\n")
print(f"- GPU-marked tests: {'passed' if tests_rc == 0 else f'FAILED (exit {tests_rc})'} (gpu-tests.txt)")
if cost_rc == 0:
    cost = json.loads((out / "cost.json").read_text())
    print(f"- counted: DP / non-private flops {cost['flops']['dptrain'] / cost['flops']['nonprivate']:.3f}, "
          f"largest micro-batch {cost['largest_micro_batch']}")
else:
    print(f"- counted: `dptrain cost` did not complete (exit {cost_rc}, cost.txt)")
attempts = list(csv.DictReader((out / "attempts.tsv").open(), delimiter="\t"))
failed = [f"{a['method']} at {a['micro_batch']} ({'timed out' if a['exit'] == '124' else 'exit ' + a['exit']}, "
          f"{a['seconds']} s)" for a in attempts if a["exit"] != "0"]
print(f"- attempts that did not complete: {', '.join(failed) or 'none'}\n")
results = {m: json.loads((out / f"bench-{m}.json").read_text()) for m in methods
           if (out / f"bench-{m}.json").exists()}
if not results:
    print("no bench run completed")
    sys.exit(0)
gib = lambda b: f"{b / 2**30:.1f}" if b is not None else "-"  # noqa: E731
print("| method | micro-batch | s/step (min..max) | tokens/s | MFU | peak GiB | reserved GiB |")
print("|---|---|---|---|---|---|---|")
for m, b in results.items():
    s = b["seconds_spread"][m]
    mfu = f"{b['mfu'][m]:.1%}" if m in b["mfu"] else "-"
    print(f"| {m} | {b['micro_batch']} x {b['seq_len']} | {s['median']:.3f} ({s['min']:.3f}..{s['max']:.3f}) "
          f"| {b['tokens_per_second'][m]:.0f} | {mfu} | {gib(b['peak_bytes'].get(m))} "
          f"| {gib(b['reserved_bytes'].get(m))} |")
tps = {m: b["tokens_per_second"][m] for m, b in results.items()}
print(f"\nmedian of {next(iter(results.values()))['steps']} steps, each method at its own largest micro-batch; "
      "throughput ratios (tokens/s):")
if "dptrain" in tps and "nonprivate" in tps:
    print(f"- dptrain / non-private: {tps['dptrain'] / tps['nonprivate']:.2f}")
if "dptrain" in tps and "opacus-ghost" in tps:
    print(f"- Opacus ghost / dptrain: {tps['opacus-ghost'] / tps['dptrain']:.2f}")
PYEOF
cat "$OUT/summary.md"
echo "results in $OUT"
[ "$TESTS_RC" -eq 0 ] && [ "$BENCH_RC" -eq 0 ]
