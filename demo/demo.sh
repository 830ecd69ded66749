#!/usr/bin/env bash
# The FCSP demo: two tenants share GPU 0 with different shares and memory quotas.
# Runs as root after `make install`; uses the installed hooks.d entry, podman and runc.
# On a host without a GPU the containers still get their slots (simulated GPU 0).
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-/opt/fcsp/venv/bin/python3}
work=${FCSP_DEMO_DIR:-/var/tmp/fcsp-demo}
rootfs=$work/rootfs
ulimits=(--ulimit "nofile=$(ulimit -Hn):$(ulimit -Hn)" --ulimit nproc=4096:4096)

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
cleanup() { podman rm -f --ignore -t 0 fcsp-demo-a fcsp-demo-b >/dev/null 2>&1 || true; }
trap cleanup EXIT
cleanup

if [ ! -x "$rootfs/usr/bin/cat" ]; then
    rm -rf "$rootfs"
    "$python" -m tests.containers rootfs "$rootfs"
fi

say "tenant A: fcsp.sm=40 fcsp.mem=8G   tenant B: fcsp.sm=60 fcsp.mem=50% fcsp.mode=strict"
podman run -d -i --name fcsp-demo-a --runtime runc "${ulimits[@]}" \
    --annotation fcsp.sm=40 --annotation fcsp.mem=8G --annotation fcsp.tenant=team-a \
    -e NVIDIA_VISIBLE_DEVICES=0 --rootfs "$rootfs" /usr/bin/cat >/dev/null
podman run -d -i --name fcsp-demo-b --runtime runc "${ulimits[@]}" \
    --annotation fcsp.sm=60 --annotation fcsp.mem=50% --annotation fcsp.mode=strict \
    --annotation fcsp.tenant=team-b -e NVIDIA_VISIBLE_DEVICES=0 --rootfs "$rootfs" /usr/bin/cat >/dev/null

for c in fcsp-demo-a fcsp-demo-b; do
    say "$c: /etc/ld.so.preload and the shim in its glibc process"
    podman exec "$c" /usr/bin/cat /etc/ld.so.preload
    podman exec "$c" /bin/grep -E 'fcsp/(libvgpu.so|limits|usage)' /proc/1/maps | awk '{print $1, $2, $6}' | sort -u -k3,3
done

say "fcspctl status"
fcspctl status

say "a bad annotation is refused with one line"
podman run --rm --runtime runc "${ulimits[@]}" --annotation fcsp.sm=abc \
    -e NVIDIA_VISIBLE_DEVICES=0 --rootfs "$rootfs" /usr/bin/cat /dev/null 2>&1 | sed 's/.*stderr: //' || true

say "after podman rm, the slots are gone"
cleanup
fcspctl status
