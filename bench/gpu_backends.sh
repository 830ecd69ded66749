#!/usr/bin/env bash
# Both compute backends side by side (issue 8, item 6): bench/observer_bench.py once with
# the GPU time-sliced, once over FCSP's MPS daemon, then one table.
#
# Run as root from the repository root on the GPU machine:
#     OUT=/some/dir bash bench/gpu_backends.sh
# Writes $OUT/mps.md, and per backend observer-<backend>.md, -raw.json, PNGs and logs.
# About 6 minutes (BENCH_ARGS shortens or lengthens every measurement).
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$REPO/bench/results/out}
export OUT PYTHONUNBUFFERED=1
mkdir -p "$OUT"
make -C "$REPO" -s shim || echo "shim build failed"
read -r -a args <<<"${BENCH_ARGS:---warmup 1.5 --measure 3 --phase 2 --repeats 3}"
sections=solo,four,noisy,accuracy,pair,latency_capped
# SIGINT at the limit: the bench still writes what it measured.
limit=${BENCH_LIMIT_S:-290}
timeout -s INT "$limit" python3 "$REPO/bench/observer_bench.py" --backend timeslice \
    --only "$sections" "${args[@]}"
timeout -s INT "$limit" python3 "$REPO/bench/observer_bench.py" --backend mps \
    --only "$sections,fault" "${args[@]}"
python3 "$REPO/bench/backends_report.py" "$OUT" >"$OUT/mps.md"
echo "wrote $OUT/mps.md"
