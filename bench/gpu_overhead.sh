#!/usr/bin/env bash
# In-process A/B cost of libvgpu.so's launch and allocation hooks on a real GPU.
# Run as root from the repository root on the GPU machine: OUT=/some/dir bash bench/gpu_overhead.sh
# Writes $OUT/overhead.md.  See bench/gpu_overhead.cu for the method.
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$REPO/bench/results/out}
WORK=$(mktemp -d /tmp/fcsp-overhead.XXXXXX)
PY=${PYTHON:-python3}
SHIM=$REPO/shim/libvgpu.so
mkdir -p "$OUT"
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
make -C "$REPO" -s shim >"$WORK/build.log" 2>&1 || { cat "$WORK/build.log"; exit 1; }
nvcc -O2 -o "$WORK/probe" "$REPO/bench/gpu_overhead.cu" -ldl >>"$WORK/build.log" 2>&1 || { cat "$WORK/build.log"; exit 1; }

slot() { # dir sm_centi
    "$PY" - "$1" "$2" <<'PYEOF'
import sys
from pathlib import Path
from fcsp_hook.slot import DeviceLimits, SlotSpec, write_slot
write_slot(Path(sys.argv[1]), SlotSpec(container_id="overhead", devices=(
    DeviceLimits(host_index=0, mem_limit_bytes=64 << 30, sm_requested_centi=int(sys.argv[2])),)), {})
PYEOF
}
slot "$WORK/quota" 10000
slot "$WORK/limited" 9000

field() { sed -n "s/^$2 //p" "$1"; }
{
    echo "| shim state | hooked | driver launch (us) | extra per launch (us) | driver malloc+free 1 MiB (us) | extra per malloc+free (us) |"
    echo "|---|---|---|---|---|---|"
    for mode in passthrough quota limited; do
        case $mode in
        passthrough) env LD_PRELOAD="$SHIM" "$WORK/probe" 30 >"$WORK/$mode.txt" 2>&1 ;;
        quota) env LD_PRELOAD="$SHIM" FCSP_SLOT_DIR="$WORK/quota" "$WORK/probe" 30 >"$WORK/$mode.txt" 2>&1 ;;
        limited) env LD_PRELOAD="$SHIM" FCSP_SLOT_DIR="$WORK/limited" "$WORK/probe" 30 >"$WORK/$mode.txt" 2>&1 ;;
        esac
        f=$WORK/$mode.txt
        label=$mode
        [ $mode = passthrough ] && label="pass-through (no slot, no BUD_*)"
        [ $mode = quota ] && label="memory quota 64 GiB, share 100 %"
        [ $mode = limited ] && label="memory quota 64 GiB, share 90 % (limiter on, tokens available)"
        echo "| $label | $(field "$f" hooked) | $(field "$f" launch_us) | $(field "$f" launch_extra_us) | $(field "$f" malloc_free_us) | $(field "$f" malloc_free_extra_us) |"
        [ -n "$(field "$f" launch_us)" ] || sed 's/^/    /' "$f" >&2
    done
    throttled=$("$PY" -c "import sys; from pathlib import Path; from fcsp_hook.slot import read_usage; print(read_usage(Path(sys.argv[1]) / 'usage').device[0].throttled_ns / 1e6)" "$WORK/limited")
    echo
    echo "Per round: 5000 empty-kernel launches 10 us apart and 300 malloc+free pairs of 1 MiB through each path; 30 rounds, alternating which path goes first; medians of the paired differences. Time the limited tenant spent throttled: ${throttled} ms."
} >"$OUT/overhead.md"
cat "$OUT/overhead.md"
rm -rf "$WORK"
