#!/usr/bin/env bash
# In-process A/B cost of libvgpu.so's launch and allocation hooks on a real GPU.
# Run as root from the repository root on the GPU machine: OUT=/some/dir bash bench/gpu_overhead.sh
# Writes $OUT/overhead.md (probe outputs in $OUT/overhead-raw/).  See bench/gpu_overhead.py
# and bench/gpu_overhead.cu for the method.
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
BENCH_COMMAND=$(PYTHONPATH=$REPO/bench "$PY" -m lib.report command bash bench/gpu_overhead.sh "$@")
export BENCH_COMMAND
OUT=${OUT:-$REPO/bench/results/out}
WORK=$(mktemp -d /tmp/fcsp-overhead.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
make -C "$REPO" -s shim >"$WORK/build.log" 2>&1 || { cat "$WORK/build.log"; exit 1; }
nvcc -O2 -o "$WORK/probe" "$REPO/bench/gpu_overhead.cu" -ldl >>"$WORK/build.log" 2>&1 || { cat "$WORK/build.log"; exit 1; }
OUT=$OUT "$PY" "$REPO/bench/gpu_overhead.py" --probe "$WORK/probe" --work "$WORK/scene"
