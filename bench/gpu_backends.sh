#!/usr/bin/env bash
# Both compute backends side by side: bench/observer_bench.py once with the GPU
# time-sliced, once over FCSP's MPS daemon, then one table.
#
# Run as root from the repository root on the GPU machine:
#     OUT=/some/dir bash bench/gpu_backends.sh
# Writes $OUT/mps.md and $OUT/mps-<backend>-workday.png; each backend's own run (its
# observer.md, plot, raw numbers and logs) in $OUT/mps-raw/<backend>/.
# About 6 minutes (BENCH_ARGS shortens or lengthens every measurement; BENCH_LIMIT_S caps
# each backend's run, after which it still writes what it measured).
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
# What the operator typed, for the reports' headers, before this script changes anything.
BENCH_COMMAND=$(PYTHONPATH=$REPO/bench "$PY" -m lib.report command bash bench/gpu_backends.sh "$@")
export BENCH_COMMAND
OUT=${OUT:-$REPO/bench/results/out}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
make -C "$REPO" -s shim || echo "shim build failed"
read -r -a args <<<"${BENCH_ARGS:---warmup 1.5 --measure 3 --phase 2 --repeats 3}"
sections=solo,four,noisy,accuracy,pair,latency_capped
# SIGINT at the limit: the bench still writes what it measured.
limit=${BENCH_LIMIT_S:-290}
OUT=$OUT/mps-raw/timeslice timeout -s INT "$limit" "$PY" "$REPO/bench/observer_bench.py" \
    --backend timeslice --only "$sections" "${args[@]}"
OUT=$OUT/mps-raw/mps timeout -s INT "$limit" "$PY" "$REPO/bench/observer_bench.py" \
    --backend mps --only "$sections,fault" "${args[@]}"
"$PY" "$REPO/bench/backends_report.py" "$OUT"
