#!/usr/bin/env bash
# Facts the MPS backend is built on, measured on the GPU machine:
#  1. the control daemon in the foreground (-f): what it creates, where it logs;
#  2. a client whose pipe directory is a read-only bind mount, and one that sees only the
#     `control` socket: MPS or silently direct?
#  3. CUDA_MPS_ACTIVE_THREAD_PERCENTAGE per client: the SM count the client sees;
#  4. what NVML lists for MPS clients (compute vs MPS-compute process lists);
#  5. a client's fatal fault: what a neighbouring client sees, what the logs say, and when
#     a new client can run again.
# Run as root: OUT=/dir bash bench/mps_facts.sh   (writes $OUT/mps-facts.md; ~2 min)
# The answers are the transcript of each section, under the standard header.
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
BENCH_COMMAND=$(PYTHONPATH=$REPO/bench "$PY" -m lib.report command bash bench/mps_facts.sh "$@")
export BENCH_COMMAND
export PATH=/usr/local/nvidia/bin:$PATH
OUT=${OUT:-$REPO/bench/results/out}
mkdir -p "$OUT"
base=/tmp/fcsp-mps-facts
rm -rf $base; mkdir -p $base/pipe $base/log $base/only
PYTHONPATH=$REPO/bench "$PY" -m lib.report header --name mps-facts \
    --title "What the MPS backend rests on" \
    --measures "An MPS control daemon of its own (pipe and log directories under $base): what \
it creates and logs; whether a client reaches it through a read-only pipe directory or through \
the control socket alone; the SMs a client sees per active thread percentage; NVML's process \
lists under MPS; what a client's fatal fault does to its neighbour; and what a tenant holding \
only the control socket can command. Each section's transcript follows." >"$OUT/mps-facts.md"
export CUDA_MPS_PIPE_DIRECTORY=$base/pipe CUDA_MPS_LOG_DIRECTORY=$base/log
exec > >(tee -a "$OUT/mps-facts.md") 2>&1
fenced=0
say() { # a section: its heading, then its transcript as a code block
    [ $fenced = 1 ] && echo '```'
    echo; echo "## $*"; echo; echo '```text'
    fenced=1
}

nvcc -o $base/fault "$REPO/bench/mps_fault.cu" || echo "nvcc failed"

say "1. control daemon in the foreground"
nvidia-cuda-mps-control -f >$base/foreground.out 2>&1 &
ctl=$!
for _ in $(seq 50); do [ -S $base/pipe/control ] && break; sleep 0.1; done
echo "control pid $ctl; pipe dir:"; ls -la $base/pipe; echo "log dir:"; ls -la $base/log
probe='
import os, sys, torch
try:
    x = torch.empty(2 << 30, dtype=torch.uint8, device="cuda"); torch.cuda.synchronize()
    r = "DIRECT"
except torch.cuda.OutOfMemoryError:
    r = "MPS"
print(r, "sms", torch.cuda.get_device_properties(0).multi_processor_count)
'
export CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=0=1G
client() { timeout 60 "$@" python3 -c "$probe" 2>&1 | tail -1; }
echo "plain client: $(client env)"
echo "pipe dir contents with a server:"; ls -la $base/pipe

say "2. read-only pipe directory / only the control socket"
echo "ro bind of the pipe dir: $(client unshare --mount sh -c "mount --bind $base/pipe $base/pipe && mount -o remount,bind,ro $base/pipe && exec \"\$@\"" sh)"
touch $base/only/control
echo "only control socket (other files hidden): $(client unshare --mount sh -c "mount -t tmpfs tmpfs $base/only && touch $base/only/control && mount --bind $base/pipe/control $base/only/control && CUDA_MPS_PIPE_DIRECTORY=$base/only exec \"\$@\"" sh)"

say "3. active thread percentage per client"
for p in 25 50 100; do echo "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=$p: $(client env CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=$p)"; done

say "4. NVML process lists under MPS"
python3 - <<'PY' &
import torch, time
x = torch.ones(1 << 20, device="cuda"); torch.cuda.synchronize(); time.sleep(6)
PY
holder=$!
sleep 4
python3 - <<PY
import os, pynvml as n
n.nvmlInit(); h = n.nvmlDeviceGetHandleByIndex(0)
def names(ps):
    out = []
    for p in ps:
        try: comm = open(f"/proc/{p.pid}/comm").read().strip()
        except OSError: comm = "?"
        out.append((p.pid, comm, (p.usedGpuMemory or 0) >> 20))
    return out
print("holder pid $holder")
print("compute:", names(n.nvmlDeviceGetComputeRunningProcesses(h)))
try: print("mps:", names(n.nvmlDeviceGetMPSComputeRunningProcesses(h)))
except Exception as e: print("mps list failed", e)
PY
echo get_server_list | nvidia-cuda-mps-control
wait $holder

say "5. a client's fatal fault"
python3 - >$base/victim.out 2>&1 <<'PY' &
import time, torch
print('victim start', flush=True)
a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
t0 = time.monotonic(); n = 0; err = None
while time.monotonic() - t0 < 8:
    try:
        for _ in range(8): a @ a
        torch.cuda.synchronize(); n += 1
    except Exception as e:
        err = f"{time.monotonic() - t0:.2f}s {type(e).__name__}: {str(e).splitlines()[0][:120]}"; break
print("victim iterations", n, "error", err)
PY
victim=$!
for _ in $(seq 100); do grep -q "victim start" $base/victim.out 2>/dev/null && break; sleep 0.1; done
sleep 3
t_fault=$(date +%s.%N)
$base/fault
wait $victim; cat $base/victim.out
echo "server list after: $(echo get_server_list | nvidia-cuda-mps-control)"
for i in 1 2 3 4 5 6 7 8 9 10; do
  r=$(client env)
  echo "new client after $(python3 -c "import time;print(round(time.time()-$t_fault,1))")s: $r"
  case "$r" in MPS*) break;; esac
  sleep 1
done
echo "control.log:"; cat $base/log/control.log 2>/dev/null | tail -40
echo "server.log:"; cat $base/log/server.log 2>/dev/null | tail -40
echo "foreground output (fault and after):"; grep -n -i -B2 -A12 "fault\|exception\|error\|fatal" $base/foreground.out | head -80

say "6. what a tenant with only the control socket can command"
cmd_only() { unshare --mount sh -c "mount -t tmpfs tmpfs $base/only && touch $base/only/control && mount --bind $base/pipe/control $base/only/control && echo '$1' | CUDA_MPS_PIPE_DIRECTORY=$base/only timeout 10 nvidia-cuda-mps-control" 2>&1 | head -3 | tr '\n' ' '; }
echo "get_server_list via control only: $(cmd_only get_server_list)"
echo "set_default_active_thread_percentage 10 via control only: $(cmd_only 'set_default_active_thread_percentage 10')"
echo "get_default_active_thread_percentage (full pipe dir): $(echo get_default_active_thread_percentage | nvidia-cuda-mps-control)"
echo "quit via control only: $(cmd_only quit)"; sleep 1
kill -0 $ctl 2>/dev/null && echo "control daemon still running after quit via control only" || echo "control daemon STOPPED by quit via control only"

say "7. quit"
echo quit | nvidia-cuda-mps-control; sleep 1
kill -0 $ctl 2>/dev/null && echo "control still running" || { wait $ctl; echo "control exited with $?"; }
pgrep -a nvidia-cuda-mps || echo "no MPS process left"
echo '```'
