#!/usr/bin/env bash
# libvgpu.so on two GPUs: slot entries follow GPU UUIDs whatever the CUDA ordinals,
# per-device compute shares of two tenants, NCCL all-reduce under limits.
#
# Run as root from the repository root on a machine with two NVIDIA GPUs:
#     OUT=/some/dir bash bench/gpu_multigpu.sh
# (a copy without .git: FCSP_COMMIT=<commit> names the commit in the report)
# Needs: make, gcc, python3 with torch (CUDA, NCCL); pynvml for the SM clocks (else
# nvidia-smi is polled).  Writes $OUT/multigpu.md and raw outputs (results.json, every
# child's stdout/stderr/result, NCCL logs) in $OUT/multigpu-raw/.  Every section runs on
# its own: a failure is a row "failed: <reason>", never an abort.
#
# Environment: BENCH_SECONDS (per measurement, default 3), BENCH_BUDGET (wall-clock budget
# of the whole script in seconds, build included, default 270), BENCH_SECTIONS (default
# mapping,shares,nccl), BENCH_CLOCK_NORMALISE (the observer over the shares section: default
# full-load, empty for none), BENCH_GPUS (two NVML indices, default the first two, or the two
# that CUDA_VISIBLE_DEVICES names).  Re-render the report from the raw data with
#     python3 bench/gpu_multigpu.py report --raw $OUT/multigpu-raw --out $OUT
set -u

REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
# What the operator typed, for the report's header, before this script changes anything.
BENCH_COMMAND=$(PYTHONPATH=$REPO/bench "$PY" -m lib.report command bash bench/gpu_multigpu.sh "$@")
export BENCH_COMMAND
OUT=${OUT:-$REPO/bench/results/out}
RAW=$OUT/multigpu-raw
WORK=$(mktemp -d /tmp/fcsp-multigpu.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
STARTED=$(date +%s)
BUDGET=${BENCH_BUDGET:-270}
mkdir -p "$OUT" "$RAW"
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 # NVLink multicast stays off on the bench machine
export BENCH_BUDGET=$BUDGET
rm -f "$OUT/multigpu.md"

echo "[$(date +%H:%M:%S)] building libvgpu.so (make -s shim)"
build_ok=1
if ! make -C "$REPO" -s shim >"$RAW/build.log" 2>&1 || [ ! -f "$REPO/shim/libvgpu.so" ]; then
    build_ok=0
    echo "[$(date +%H:%M:%S)] build FAILED, see $RAW/build.log; shim runs will be failed rows"
fi

# The orchestrator keeps to the budget itself; timeout is the backstop (SIGTERM: the
# orchestrator kills its children and saves what it has; Ctrl-C reaches all of them).
timeout --foreground -k 5 $((BUDGET + 20)) "$PY" "$REPO/bench/gpu_multigpu.py" run --out "$OUT" \
    --raw "$RAW" --work "$WORK" --shim "$REPO/shim/libvgpu.so" --build-ok "$build_ok" \
    --started "$STARTED" 2>&1 | tee "$RAW/orchestrator.log"
rc=${PIPESTATUS[0]}

if [ ! -s "$OUT/multigpu.md" ]; then
    {
        echo "# FCSP on two GPUs: no report"
        echo
        echo "bench/gpu_multigpu.py exited with status $rc before writing its report."
        echo "build: $([ "$build_ok" = 1 ] && echo ok || echo FAILED); command: \`$BENCH_COMMAND\`"
        echo
        echo '```'
        tail -n 30 "$RAW/orchestrator.log" 2>/dev/null
        echo '```'
    } >"$OUT/multigpu.md"
fi

echo "[$(date +%H:%M:%S)] wrote $OUT/multigpu.md ($(($(date +%s) - STARTED)) s)"
exit $rc
