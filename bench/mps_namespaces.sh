#!/usr/bin/env bash
# Does an MPS client in its own IPC / PID / mount namespaces reach the MPS server with only
# the pipe directory shared?  One table row per variant.  Leaves no daemon running.
# Run as root: OUT=/dir bash bench/mps_namespaces.sh   (writes $OUT/mps-namespaces.md)
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
BENCH_COMMAND=$(PYTHONPATH=$REPO/bench "$PY" -m lib.report command bash bench/mps_namespaces.sh "$@")
export BENCH_COMMAND
export PATH=/usr/local/nvidia/bin:$PATH
OUT=${OUT:-$REPO/bench/results/out}
mkdir -p "$OUT"
base=/tmp/fcsp-mps
rm -rf $base; mkdir -p $base/pipe $base/log
PYTHONPATH=$REPO/bench "$PY" -m lib.report header --name mps-namespaces \
    --title "Does an MPS client in its own namespaces reach the MPS server?" \
    --measures "One MPS control daemon (pipe and log directories under $base); each client \
is PyTorch allocating 2 GiB under CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=0=1G, a limit only MPS \
enforces: \"MPS\" means the client ran under the server, \"DIRECT\" that it silently ran \
without MPS." >"$OUT/mps-namespaces.md"
exec > >(tee -a "$OUT/mps-namespaces.md") 2>&1
export CUDA_MPS_PIPE_DIRECTORY=$base/pipe CUDA_MPS_LOG_DIRECTORY=$base/log
nvidia-cuda-mps-control -d || { echo "mps-control failed to start"; exit 0; }
sleep 1
# Under MPS the client's pinned-memory limit holds (2 GiB fails under a 1 GiB limit); a
# client that silently runs without MPS gets its 2 GiB.
export CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=0=1G
probe='
import torch
try:
    x = torch.empty(2 << 30, dtype=torch.uint8, device="cuda"); torch.cuda.synchronize()
    print("DIRECT: 2 GiB allowed, not under MPS")
except torch.cuda.OutOfMemoryError:
    print("MPS: 1 GiB client limit held")
except Exception as e:
    print("ERROR", type(e).__name__, str(e)[:80].replace(chr(10), " "))
'
run() { # label, command prefix...
    local label=$1; shift
    local out
    out=$(timeout 60 "$@" python3 -c "$probe" 2>&1 | tail -1)
    local servers clients
    servers=$(echo get_server_list | nvidia-cuda-mps-control 2>&1 | tr '\n' ' ')
    printf '| %s | %s | %s |\n' "$label" "$out" "$servers"
}
echo
echo "| client | result | MPS servers after it |"
echo "|---|---|---|"
run "same namespaces" env
run "own IPC namespace" unshare --ipc
run "own PID namespace" unshare --pid --fork --mount-proc
run "own mount namespace, /dev/shm shared" unshare --mount
run "own mount ns + private /dev/shm" unshare --mount sh -c 'mount -t tmpfs tmpfs /dev/shm && exec "$@"' sh
run "own IPC+PID+mount namespaces" unshare --ipc --pid --fork --mount --mount-proc
run "own IPC+PID+mount ns + private /dev/shm" unshare --ipc --pid --fork --mount --mount-proc sh -c 'mount -t tmpfs tmpfs /dev/shm && exec "$@"' sh
run "no pipe directory (control)" env -u CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_PIPE_DIRECTORY=/tmp/nonexistent-pipe
echo
echo '```text'
echo "server log tail:"; tail -5 $base/log/control.log 2>/dev/null
ls -la $base/pipe
echo quit | nvidia-cuda-mps-control
sleep 1
pgrep -a nvidia-cuda-mps || echo "no MPS process left"
echo '```'
