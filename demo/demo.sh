#!/usr/bin/env bash
# The FCSP demo: two tenants share GPU 0 with different shares and memory quotas, under
# the installed hooks.d entry, podman + runc, libvgpu.so and one fcsp-observer.
# Runs as root after `make install`.  The GPU is FCSP's simulated one (tests/sim: a
# libcuda.so.1 that models memory and a kernel timeline shared by both containers), so
# the demo shows enforcement on any machine; on a GPU host, real containers get the real
# driver from nvidia-container-toolkit instead.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-/opt/fcsp/venv/bin/python3}
work=${FCSP_DEMO_DIR:-/var/tmp/fcsp-demo}
rootfs=$work/rootfs
config=/etc/fcsp/config.toml
# podman's defaults can exceed a host's hard limits (some allow only 20000 open files).
podman_run=(podman run --runtime runc --ulimit "nofile=$(ulimit -Hn):$(ulimit -Hn)"
            --ulimit nproc=4096:4096)
# One simulated GPU with 80 GiB, its state shared by both containers.  The simulator keys
# its bookkeeping by pid, so the demo's tenants share the host's pid namespace.
gpu=(-e NVIDIA_VISIBLE_DEVICES=0 -e FCSP_SIM_STATE=/sim/state -e FCSP_SIM_DEVICES=1
     -e FCSP_SIM_MEM_BYTES=$((80 << 30)) -v "$work/sim:/sim" --pid host)
observer=""
hookd=""

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
cleanup() {
    podman rm -f --ignore -t 0 fcsp-demo-a fcsp-demo-b >/dev/null 2>&1 || true
    [ -z "$observer" ] || kill "$observer" 2>/dev/null || true
    [ -z "$hookd" ] || kill "$hookd" 2>/dev/null || true
}
trap cleanup EXIT
cleanup

rm -rf "$rootfs" "$work/sim"
mkdir -p "$work/sim"
"$python" -m tests.containers rootfs "$rootfs" --cuda-sim

say "fcsp-observer (normally: systemctl start fcsp-observer)"
/opt/fcsp/venv/bin/fcsp-observer --config "$config" >"$work/observer.log" 2>&1 &
observer=$!
echo "pid $observer, log $work/observer.log"

say "fcsp-hookd: container starts without a Python start each (normally: its systemd socket)"
/opt/fcsp/venv/bin/fcsp-hookd --config "$config" >"$work/hookd.log" 2>&1 &
hookd=$!
echo "pid $hookd, log $work/hookd.log"

# A tenant: create a context, allocate, then launch 500 us kernels for 40 s.
tenant() { # name, alloc size, annotations...
    local name=$1 size=$2
    shift 2
    local args=()
    for a in "$@"; do args+=(--annotation "$a"); done
    "${podman_run[@]}" -d --name "$name" "${args[@]}" "${gpu[@]}" --rootfs "$rootfs" \
        /usr/bin/fcsp-sim-client init ctx 0 alloc mem "$size" func k_500us run kernel 2 40 >/dev/null
}

say "tenant A: fcsp.sm=40 fcsp.mem=8G   tenant B: fcsp.sm=60 fcsp.mem=50%   (balanced mode)"
tenant fcsp-demo-a 6G fcsp.sm=40 fcsp.mem=8G fcsp.tenant=team-a
tenant fcsp-demo-b 30G fcsp.sm=60 fcsp.mem=50% fcsp.tenant=team-b
sleep 4

say "inside tenant A: the shim is loaded and its slot is mounted"
podman exec fcsp-demo-a /usr/bin/cat /etc/ld.so.preload
pid=$(podman inspect --format '{{.State.Pid}}' fcsp-demo-a)
grep -E 'fcsp/(libvgpu.so|limits|usage)' "/proc/$pid/maps" | awk '{print $2, $6}' | sort -u -k2,2

say "fcspctl status: both busy, each held to its share"
fcspctl --config "$config" status

say "tenant B leaves: its share flows to A (work conservation)"
podman rm -f -t 0 fcsp-demo-b >/dev/null
sleep 2
fcspctl --config "$config" status

say "resize A without a restart: fcspctl set team-a --sm 25 --mode strict"
fcspctl --config "$config" set team-a --sm 25 --mode strict >/dev/null
sleep 1
fcspctl --config "$config" status

say "an allocation past the quota fails inside the container (fcsp.mem=1G, asks 2G)"
"${podman_run[@]}" --rm --annotation fcsp.mem=1G "${gpu[@]}" --rootfs "$rootfs" \
    /usr/bin/fcsp-sim-client init ctx 0 meminfo alloc mem 2G 2>&1 | tail -2 || true
echo "(meminfo: free and total as the tenant sees them; err 2 is CUDA_ERROR_OUT_OF_MEMORY)"

say "a bad annotation is refused with one line"
"${podman_run[@]}" --rm --annotation fcsp.sm=abc -e NVIDIA_VISIBLE_DEVICES=0 \
    --rootfs "$rootfs" /usr/bin/cat /dev/null 2>&1 | sed 's/.*stderr: //' || true

say "after podman rm, the slots are gone"
podman rm -f -t 0 fcsp-demo-a >/dev/null
sleep 1
fcspctl --config "$config" status
