#!/usr/bin/env bash
# libvgpu.so compute shares on a real GPU: single tenants, 30/70 pairs, the launch cost.
#
# Run as root from the repository root on the GPU machine:
#     OUT=/some/dir bash bench/gpu_compute.sh
# Needs: make, gcc, nvcc, python3 with torch (CUDA) and matplotlib.
# Writes $OUT/compute.md (markdown), $OUT/compute.png (achieved vs requested) and keeps
# raw worker outputs in $OUT/compute-raw/ (turn-margins.txt: per tenant, its turn margin,
# throttled and busy time, the clock scale the observer gave it, min/median/max, in
# 1/10000, and the medians of the clock, utilisation and power the observer read).
# Every section runs on its own: a failure is a row in the table, not an abort.
# Budget: under 8 minutes (BENCH_SECONDS per run).
# fcsp-observer runs over the bench's strict slots as on a host, with the default
# clock_normalise = "full-load"; BENCH_CLOCK_NORMALISE=off runs it with that setting, and
# BENCH_CLOCK_NORMALISE= (empty) runs no observer: the shim alone holds each tenant to its
# share of GPU time.  BENCH_CLOCK_MAX_SPEEDUP_PCT sets clock_max_speedup_pct.
# BENCH_SECTIONS: some of single,pair,overhead (default all); BENCH_SHIM_LOG_LEVEL=debug
# keeps the shim's calibration samples in compute-raw/*.err.
# BENCH_SIZES=n1,n2,n3 fixes the three matmul sizes (else calibrated to 20 us, 500 us, 5 ms).
set -u

REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
# What the operator typed, for the report's header, before this script changes anything.
BENCH_COMMAND=$(PYTHONPATH=$REPO/bench "$PY" -m lib.report command bash bench/gpu_compute.sh "$@")
export BENCH_COMMAND
OUT=${OUT:-$REPO/bench/results/out}
RAW=$OUT/compute-raw
WORK=$(mktemp -d /tmp/fcsp-compute.XXXXXX)
mkdir -p "$OUT" "$RAW"
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}

build_ok=1
if ! make -C "$REPO" -s shim >"$RAW/build.log" 2>&1 || [ ! -f "$REPO/shim/libvgpu.so" ]; then
    build_ok=0
fi
probe=""
if nvcc -O2 -o "$WORK/launch_probe" "$REPO/bench/gpu_overhead.cu" -ldl >>"$RAW/build.log" 2>&1; then
    probe=$WORK/launch_probe
fi

"$PY" "$REPO/bench/gpu_compute.py" run --out "$OUT" --raw "$RAW" --work "$WORK" \
    --shim "$REPO/shim/libvgpu.so" --build-ok "$build_ok" --probe "$probe" \
    --clock-normalise "${BENCH_CLOCK_NORMALISE-full-load}" \
    --clock-max-speedup-pct "${BENCH_CLOCK_MAX_SPEEDUP_PCT:-}"
rc=$?
rm -rf "$WORK"
echo "wrote $OUT/compute.md and $OUT/compute.png"
exit $rc
