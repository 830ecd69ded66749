#!/usr/bin/env bash
# libvgpu.so memory quotas and overhead on a real GPU.
#
# Run as root from the repository root on the GPU machine:
#     OUT=/some/dir bash bench/gpu_memory.sh
# Needs: make, gcc, nvcc, python3 with torch (CUDA) and, optionally, pynvml.
# Writes $OUT/memory.md (markdown) and keeps raw outputs in $OUT/memory-raw/.
# Every section runs on its own: a failure is a row in the table, not an abort.
set -u

REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
# What the operator typed, for the report's header, before this script changes anything.
BENCH_COMMAND=$(PYTHONPATH=$REPO/bench "$PY" -m lib.report command bash bench/gpu_memory.sh "$@")
export BENCH_COMMAND
OUT=${OUT:-$REPO/bench/results/out}
RAW=$OUT/memory-raw
WORK=$(mktemp -d /tmp/fcsp-bench.XXXXXX)
SHIM=$REPO/shim/libvgpu.so
QUOTA=$((8 << 30))
RACE_QUOTA=$((1 << 30))
RACE_BYTES=$((600 * 1000 * 1000))
mkdir -p "$OUT" "$RAW"
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
benchlib() { PYTHONPATH=$REPO/bench "$PY" -m "$@"; } # bench/lib: lib.scene, lib.report
ROWS=$WORK/rows.md
: >"$ROWS"

row() { # section, result (PASS/FAIL/INFO), detail
    printf '| %s | %s | %s |\n' "$1" "$2" "$3" >>"$ROWS"
    printf '%-40s %-5s %s\n' "$1" "$2" "$3"
}

# A slot directory with one device and a byte quota; prints its path.
make_slot() { # name bytes
    rm -rf "${WORK:?}/$1"
    benchlib lib.scene slot "$WORK/$1" --mem "$2"
}

# One field of the usage file of a slot: mem_used_bytes, mem_peak_bytes, launches, ...
usage_field() { # dir field
    benchlib lib.scene usage "$1" "$2"
}

json_get() { # json key
    "$PY" -c 'import json,sys; v=json.loads(sys.argv[1]).get(sys.argv[2]); print("" if v is None else v)' "$1" "$2" 2>/dev/null
}

gib() { "$PY" -c "print(f'{int(\"${1:-0}\" or 0) / 2**30:.2f} GiB')"; }

# ---- build ------------------------------------------------------------------------
section_build() {
    if make -C "$REPO" -s shim >"$RAW/build.log" 2>&1 && [ -f "$SHIM" ]; then
        row "build libvgpu.so" PASS "make shim"
    else
        row "build libvgpu.so" FAIL "see memory-raw/build.log"
        return 1
    fi
    if nvcc -O2 -o "$WORK/launch_bench" "$REPO/bench/gpu_memory_launch.cu" >>"$RAW/build.log" 2>&1; then
        row "build launch probe" PASS "nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')"
    else
        row "build launch probe" FAIL "see memory-raw/build.log"
    fi
}

# ---- PyTorch under an 8 GiB quota ---------------------------------------------------
CONTEXT_BYTES=""
section_context() {
    local out
    out=$("$PY" "$REPO/bench/gpu_memory_torch.py" context 2>"$RAW/context.err")
    echo "$out" >"$RAW/context.json"
    CONTEXT_BYTES=$(json_get "$out" context)
    if [ -n "$CONTEXT_BYTES" ]; then
        row "native CUDA context size (NVML - reserved)" INFO "$(gib "$CONTEXT_BYTES")"
    else
        row "native CUDA context size" INFO "unknown (pynvml missing?) $(tail -c 200 "$RAW/context.err")"
    fi
}

section_torch_quota() { # label, extra env (e.g. PYTORCH_CUDA_ALLOC_CONF=...)
    local label=$1 extra=${2:-} slot out total oom alloc nvml launches peak
    slot=$(make_slot "torch-$label" "$QUOTA") || { row "torch $label" FAIL "cannot create slot"; return; }
    out=$(env $extra FCSP_SLOT_DIR="$slot" LD_PRELOAD="$SHIM" \
        "$PY" "$REPO/bench/gpu_memory_torch.py" quota "$QUOTA" 2>"$RAW/torch-$label.err")
    echo "$out" >"$RAW/torch-$label.json"
    total=$(json_get "$out" total)
    oom=$(json_get "$out" oom_raised)
    alloc=$(json_get "$out" allocated)
    nvml=$(json_get "$out" nvml_process_used)
    if [ -z "$total" ]; then
        row "torch $label" FAIL "probe failed: $(tail -c 300 "$RAW/torch-$label.err" | tr '\n|' '  ')"
        return
    fi
    [ "$total" = "$QUOTA" ] && row "torch $label: mem_get_info total == quota" PASS "$(gib "$total")" \
        || row "torch $label: mem_get_info total == quota" FAIL "total $(gib "$total")"
    if [ "$oom" = "True" ] && [ "$alloc" -le "$QUOTA" ]; then
        row "torch $label: past quota raises OutOfMemoryError" PASS "held $(gib "$alloc") before OOM"
    else
        row "torch $label: past quota raises OutOfMemoryError" FAIL "oom=$oom held $(gib "$alloc")"
    fi
    if [ -n "$nvml" ] && [ -n "$CONTEXT_BYTES" ]; then
        if [ "$nvml" -le $((QUOTA + CONTEXT_BYTES + (64 << 20))) ]; then
            row "torch $label: NVML process use <= quota + context" PASS "$(gib "$nvml") (context $(gib "$CONTEXT_BYTES"))"
        else
            row "torch $label: NVML process use <= quota + context" FAIL "$(gib "$nvml") (context $(gib "$CONTEXT_BYTES"))"
        fi
    else
        row "torch $label: NVML process use" INFO "not measured (pynvml or context missing)"
    fi
    launches=$(usage_field "$slot" launches)
    peak=$(usage_field "$slot" mem_peak_bytes)
    if [ "${launches:-0}" -gt 0 ] && [ "${peak:-0}" -gt 0 ]; then
        row "torch $label: shim saw allocations and launches" PASS "usage: peak $(gib "$peak"), $launches launches"
    else
        row "torch $label: shim saw allocations and launches" FAIL "usage: peak ${peak:-?} launches ${launches:-?}"
    fi
}

# ---- two processes racing under 1 GiB ---------------------------------------------------
section_race() {
    local rounds=5 worst=0 failures=0 r slot barrier a b oks peak
    for r in $(seq 1 $rounds); do
        slot=$(make_slot "race-$r" "$RACE_QUOTA") || { failures=$((failures + 1)); continue; }
        barrier=$WORK/race-$r.go
        FCSP_SLOT_DIR=$slot LD_PRELOAD=$SHIM "$PY" "$REPO/bench/gpu_memory_torch.py" race \
            "$RACE_BYTES" "$barrier" >"$RAW/race-$r-a.json" 2>"$RAW/race-$r-a.err" &
        a=$!
        FCSP_SLOT_DIR=$slot LD_PRELOAD=$SHIM "$PY" "$REPO/bench/gpu_memory_torch.py" race \
            "$RACE_BYTES" "$barrier" >"$RAW/race-$r-b.json" 2>"$RAW/race-$r-b.err" &
        b=$!
        sleep 8 # both contexts up (the probe creates its context before waiting)
        touch "$barrier"
        wait $a $b
        oks=$(cat "$RAW/race-$r-a.json" "$RAW/race-$r-b.json" | grep -c '"ok": true')
        peak=$(usage_field "$slot" mem_peak_bytes)
        [ "${peak:-0}" -gt "$worst" ] && worst=$peak
        if [ "$oks" -ne 1 ] || [ "${peak:-0}" -gt "$RACE_QUOTA" ]; then
            failures=$((failures + 1))
        fi
    done
    if [ "$failures" -eq 0 ]; then
        row "race: 2 x 600 MB under 1 GiB, $rounds rounds" PASS "exactly one granted each round; peak charge $(gib "$worst")"
    else
        row "race: 2 x 600 MB under 1 GiB, $rounds rounds" FAIL "$failures bad rounds; peak charge $(gib "$worst"); see memory-raw/race-*"
    fi
}

# ---- overhead --------------------------------------------------------------------------
section_overhead() {
    [ -x "$WORK/launch_bench" ] || { row "overhead" FAIL "no launch probe"; return; }
    local mode slot out round modes
    slot=$(make_slot overhead $((64 << 30)))
    # Control: preloading any library at all (an empty one) vs preloading the shim.
    echo 'int fcsp_empty_control;' | gcc -shared -fPIC -x c -o "$WORK/libempty.so" - 2>>"$RAW/build.log"
    modes="native empty passthrough quota"
    for mode in $modes; do : >"$WORK/ovh-$mode"; done
    # Clocks and caches drift over a run: rotate the order every round, take medians.
    for round in 1 2 3 4 5 6; do
        for mode in $modes; do
            case $mode in
            native) out=$("$WORK/launch_bench" 2>>"$RAW/overhead.err") ;;
            empty) out=$(LD_PRELOAD=$WORK/libempty.so "$WORK/launch_bench" 2>>"$RAW/overhead.err") ;;
            passthrough) out=$(LD_PRELOAD=$SHIM "$WORK/launch_bench" 2>>"$RAW/overhead.err") ;;
            quota) out=$(FCSP_SLOT_DIR=$slot LD_PRELOAD=$SHIM "$WORK/launch_bench" 2>>"$RAW/overhead.err") ;;
            esac
            echo "$out" >>"$RAW/overhead-$mode.txt"
            echo "$out" >>"$WORK/ovh-$mode"
        done
        modes="${modes#* } ${modes%% *}"
    done
    "$PY" - "$WORK" >>"$WORK/overhead.md" <<'PYEOF'
import statistics, sys
from pathlib import Path
work = Path(sys.argv[1])
def vals(mode, key):
    return [float(l.split()[1]) for l in (work / f"ovh-{mode}").read_text().splitlines() if l.startswith(key + " ")]
def med(mode, key):
    v = vals(mode, key)
    return statistics.median(v) if v else float("nan")
def spread(mode, key):
    v = vals(mode, key)
    return (max(v) - min(v)) if v else float("nan")
print("| metric | native | empty preload | pass-through | active quota | quota - native | run-to-run spread (native) | target |")
print("|---|---|---|---|---|---|---|---|")
for key, label, target in (("launch_us", "empty-kernel launch (us, enqueue)", "+0.15"),
                           ("launch_sync_us", "launch + sync (us)", "-"),
                           ("malloc_free_us", "cudaMalloc+cudaFree 1 MiB (us)", "+3")):
    n, e, p, q = (med(m, key) for m in ("native", "empty", "passthrough", "quota"))
    print(f"| {label} | {n:.3f} | {e:.3f} | {p:.3f} | {q:.3f} | {q - n:+.3f} | {spread('native', key):.3f} | {target} |")
print()
print("Medians of 6 runs per mode, modes rotated every round; each run: 200000 launches, 2000 launch+sync, 5000 malloc+free pairs.")
PYEOF
    local launches
    launches=$(usage_field "$slot" launches)
    if [ "${launches:-0}" -ge 1200000 ]; then
        row "cudart launches counted under quota" PASS "$launches launches in the usage file (6 runs)"
    else
        row "cudart launches counted under quota" FAIL "${launches:-?} launches in the usage file"
    fi
    row "overhead" INFO "see table below"
}

section_build && {
    section_context
    section_torch_quota default ""
    section_torch_quota expandable "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"
    section_race
    section_overhead
}

{
    benchlib lib.report header --name memory --title "Memory quotas and interception overhead" \
        --measures "What libvgpu.so's memory quota does for PyTorch (the total it reports, the \
OutOfMemoryError past it, the device memory NVML sees), whether two processes racing under one \
quota can both pass it, and what the hooks add to a launch and an allocation." \
        --extra "torch $("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo '?')"
    echo
    echo "| check | result | detail |"
    echo "|---|---|---|"
    cat "$ROWS"
    echo
    [ -f "$WORK/overhead.md" ] && cat "$WORK/overhead.md"
} >"$OUT/memory.md"
echo "wrote $OUT/memory.md"
rm -rf "$WORK"
