"""A containerd of the tests' own: its own root, state directory, socket and runc root
(never the system's), configured by `fcspctl install --engine containerd`, started and
stopped by the tests.  Pods use host networking, so no CNI is needed."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from tests.cri.client import Client

NAMESPACE = "k8s.io"  # the CRI plugin's containerd namespace
HANDLER = "fcsp"  # the runtime name `fcspctl install --engine containerd` adds
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0


def containerd_usable() -> str | None:
    """None when containerd and its runc shim are installed, else why not."""
    if os.geteuid() != 0:
        return "the CRI tests need root"
    for tool in ("containerd", "ctr", "containerd-shim-runc-v2", "runc"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install containerd)"
    return None


def base_config(base: Path, pause_image: str) -> str:
    """containerd 1.x config (version 2): everything under `base`; the CRI plugin with the
    local pause image, no CNI directories of the host, runc's shim with its own root."""
    return f"""version = 2
root = "{base}/root"
state = "{base}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]

[grpc]
  address = "{base}/containerd.sock"

[ttrpc]
  address = "{base}/containerd.sock.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "{base}/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause_image}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  # Never below containerd's own score: where the tests themselves run in a container,
  # lowering it (the sandbox's -998) is refused.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{base}/cni/bin"
    conf_dir = "{base}/cni/net.d"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = "{base}/runc"
        SystemdCgroup = false
"""


def fcspctl_install(config: Path, runtime_path: Path) -> subprocess.CompletedProcess[str]:
    """`fcspctl install --engine containerd --file CONFIG --runtime-path LAUNCHER`."""
    return subprocess.run(
        [
            *(sys.executable, "-m", "fcsp_hook.ctl.main", "install", "--engine", "containerd"),
            *("--file", str(config), "--runtime-path", str(runtime_path)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# What containerd 1.6 and runc create outside the tests' own directories: the shims'
# sockets (always under /run/containerd/s) and the pods' cgroups under CGROUP_PARENT.
SHIM_SOCKETS = Path("/run/containerd/s")
CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_dirs(parent: str) -> list[Path]:
    """The directories a cgroupfs parent `/name` has: one per v1 hierarchy (and the
    hybrid layout's unified one), or one on a cgroup v2 host."""
    name = parent.strip("/")
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        return [CGROUP_ROOT / name]
    return [d / name for d in sorted(CGROUP_ROOT.iterdir()) if (d / "cgroup.procs").exists()]


@dataclass
class Containerd:
    """One running containerd and a CRI client to it; pods go under cgroup_parent."""

    base: Path
    config: Path
    process: subprocess.Popen[bytes]
    log: Path
    cri: Client
    cgroup_parent: str
    made: tuple[Path, ...]  # host directories that did not exist before it started

    @property
    def socket(self) -> Path:
        return self.base / "containerd.sock"

    @classmethod
    def start(cls, base: Path, config: Path, cgroup_parent: str) -> Containerd:
        """Start containerd on `config` and wait until its CRI service answers."""
        log = base / "containerd.log"
        outside = [SHIM_SOCKETS, SHIM_SOCKETS.parent, *cgroup_dirs(cgroup_parent)]
        made = tuple(d for d in outside if not d.exists())
        with log.open("ab") as out:
            process = subprocess.Popen(
                ["containerd", "--config", str(config), "--log-level", "info"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        cri = Client(base / "containerd.sock")
        daemon = cls(base, config, process, log, cri, cgroup_parent, made)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"containerd exited with {process.returncode}: {daemon.tail()}")
            try:
                daemon.cri.version(timeout=2)
                return daemon
            except grpc.RpcError as exc:
                if time.monotonic() > deadline:
                    daemon.stop()
                    raise RuntimeError(f"containerd's CRI never answered: {daemon.tail()}") from exc
                time.sleep(0.2)

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def ctr(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ctr", "--address", str(self.socket), "--namespace", NAMESPACE, *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def import_images(self, archive: Path, names: list[str]) -> None:
        """`ctr images import` (unpacked for the CRI's snapshotter), then wait until the CRI
        plugin's own image store has seen each one."""
        done = self.ctr("images", "import", "--snapshotter", "overlayfs", str(archive))
        if done.returncode != 0:
            raise RuntimeError(f"ctr images import failed: {done.stderr.strip()}")
        deadline = time.monotonic() + START_TIMEOUT_S
        while not all(self.cri.image_present(n) for n in names):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the CRI plugin never listed {names}: {done.stdout}")
            time.sleep(0.2)

    def task_dir(self, container_id: str) -> Path:
        """The runc shim's bundle of a container (config.json, init.pid)."""
        return self.base / "state" / "io.containerd.runtime.v2.task" / NAMESPACE / container_id

    def init_pid(self, container_id: str) -> int:
        return int((self.task_dir(container_id) / "init.pid").read_text())

    def remove_every_pod(self) -> None:
        """What a kubelet does to a node being drained: stop and remove every pod."""
        for pod_id in self.cri.list_pods():
            with contextlib.suppress(grpc.RpcError):
                self.cri.stop_pod(pod_id)
            with contextlib.suppress(grpc.RpcError):
                self.cri.remove_pod(pod_id)

    def _our_shims(self) -> list[int]:
        """Pids of runc shims started by this containerd (their command line names our
        socket); the system's own containerd, if any, is never touched."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"containerd-shim" in argv[0] and str(self.socket).encode() in argv:
                pids.append(int(entry.name))
        return pids

    def stop(self) -> None:
        """Remove every pod, stop containerd and any shim it left, unmount what is left
        under base."""
        with contextlib.suppress(grpc.RpcError, ValueError):
            if self.process.poll() is None:
                self.remove_every_pod()
        self.cri.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for pid in self._our_shims():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        unmount_under(self.base)
        for directory in self.made:  # deepest first; left alone if anything is in it
            with contextlib.suppress(OSError):
                directory.rmdir()


def unmount_under(base: Path) -> None:
    """Lazily unmount every mount point under base, deepest first."""
    prefix = str(base) + "/"
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point.startswith(prefix):
                points.append(point)
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)
