"""Real containers for the end-to-end tests: tiny rootfs trees run by podman + runc with the
real fcsp hook from a hooks.d directory.  No registry, no image store: `podman --rootfs`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fcsp_hook.hook import hooksd, runtime

REPO = Path(__file__).resolve().parent.parent
LIBRARY = REPO / "shim" / "libvgpu.so"
BUSYBOX = Path("/bin/busybox")
# A dynamically linked glibc program and what it needs: this is what ld.so.preload reaches.
GLIBC_PROGRAM = Path("/bin/cat")
GLIBC_IN_ROOTFS = Path("/usr/bin/cat")
# This machine's hard limit for open files is 20000, and crun refuses RLIMIT_NPROC here.
ULIMITS = ("--ulimit", "nofile=20000:20000", "--ulimit", "nproc=4096:4096")


def hook_interpreter(venv: Path) -> Path:
    """A venv whose only addition is this checkout, so hooks run the working tree's code.

    The hook runs `python -I`, which ignores PYTHONPATH and the current directory but
    still reads the venv's .pth files: the same way an installed package is found.
    """
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python3"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(site) / "fcsp-checkout.pth").write_text(f"{REPO}\n")
    return python


def podman_usable() -> str | None:
    """None when podman and runc can run containers here, else why not."""
    if os.geteuid() != 0:
        return "end-to-end tests need root"
    for tool in ("podman", "runc"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


SIM_DIR = REPO / "tests" / "build" / "sim"
HOOK_CLIENT = REPO / "hookc" / "fcsp-hook"  # the hooks.d entry's program, built by make
NATIVE_RUNTIME = REPO / "hookc" / "fcsp-runtime"  # fcsp-runtime's native launcher, too
SIM_CLIENT = REPO / "tests" / "build" / "shim" / "drv_procaddr"


def _copy_with_libs(program: Path, root: Path, dest_path: Path | None = None) -> None:
    out = subprocess.run(["ldd", str(program)], capture_output=True, text=True, check=True).stdout
    needed = [program]
    for line in out.splitlines():
        parts = line.split()
        path = next((p for p in parts if p.startswith("/")), None)
        if path:
            needed.append(Path(path))
    for path in needed:
        dest = root / ((dest_path or GLIBC_IN_ROOTFS) if path == program else path).relative_to("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path.resolve(), dest)


def build_base_rootfs(root: Path) -> Path:
    """busybox-static (ignores ld.so.preload) plus glibc's /bin/cat (honours it)."""
    for d in ("bin", "etc", "proc", "sys", "dev", "tmp", "run"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for applet in ("sh", "ls", "grep", "sleep", "echo", "test", "stat", "readlink"):
        (root / "bin" / applet).symlink_to("busybox")
    # Only what cat needs: with glibc >= 2.34 that is neither libdl.so.2 nor
    # libpthread.so.0, as in a hand-assembled image, and libvgpu.so must load without them.
    _copy_with_libs(GLIBC_PROGRAM, root)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    return root


def add_cuda_sim(root: Path) -> None:
    """The simulated CUDA driver and NVML where an image's driver libraries would be, and a
    driver-API client (it loads libcuda.so.1 the way the CUDA runtime does)."""
    libdir = root / "usr" / "lib" / "x86_64-linux-gnu"
    libdir.mkdir(parents=True, exist_ok=True)
    for lib in ("libcuda.so.1", "libnvidia-ml.so.1"):
        shutil.copy2(SIM_DIR / lib, libdir / lib)
    _copy_with_libs(SIM_CLIENT, root, Path("/usr/bin/fcsp-sim-client"))


@dataclass
class HookSetup:
    """A hooks.d directory whose entry runs the real hook with a test config.toml: the
    native client, as `make install` writes it, which runs the Python hook whenever no
    fcsp-hookd answers (the tests that want one start it: HookServer)."""

    hooks_dir: Path
    run_dir: Path
    log_file: Path
    config_path: Path

    @classmethod
    def create(
        cls, base: Path, python: Path, failure_policy: str = "fail-closed", paths: str = ""
    ) -> HookSetup:
        hooks_dir, run_dir = base / "hooks.d", base / "run"
        hooks_dir.mkdir(parents=True)
        log_file = base / "hook.log"
        config_path = base / "config.toml"
        config_path.write_text(
            f'[hook]\nlibrary = "{LIBRARY}"\nlog_file = "{log_file}"\n'
            f'failure_policy = "{failure_policy}"\n[paths]\nrun_dir = "{run_dir}"\n{paths}'
        )
        entry = hooksd.render(str(python), config_path, str(HOOK_CLIENT))
        (hooks_dir / "fcsp.json").write_text(entry)
        return cls(hooks_dir, run_dir, log_file, config_path)

    def slots(self) -> list[Path]:
        tenants = self.run_dir / "tenants"
        return sorted(tenants.iterdir()) if tenants.is_dir() else []

    def log_records(self) -> list[dict[str, object]]:
        if not self.log_file.exists():
            return []
        return [json.loads(line) for line in self.log_file.read_text().splitlines()]


@dataclass
class HookServer:
    """fcsp-hookd over a HookSetup's config, started by the test, stopped after it."""

    hook: HookSetup
    proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.hook.run_dir / hooksd.HOOKD_SOCKET

    def start(self, python: Path) -> HookServer:
        self.proc = subprocess.Popen(
            [
                str(python),
                "-I",
                "-m",
                "fcsp_hook.hook.server",
                "--config",
                str(self.hook.config_path),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while not self.socket.is_socket():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("fcsp-hookd did not start listening")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def forget_next_runtime(config: Path) -> None:
    """Remove the record fcsp-runtime leaves under /run/fcsp-runtime for a test's config."""
    Path(runtime.next_record(str(config))).unlink(missing_ok=True)


def podman(
    hook: HookSetup,
    rootfs: Path,
    command: list[str],
    annotations: dict[str, str] | None = None,
    env: dict[str, str] | None = None,
    *,
    runtime: str = "runc",
    extra: tuple[str, ...] = ("--rm",),
) -> subprocess.CompletedProcess[str]:
    argv = ["podman", "--hooks-dir", str(hook.hooks_dir), "run", "--runtime", runtime, *ULIMITS]
    argv += list(extra)
    for key, value in (annotations or {}).items():
        argv += ["--annotation", f"{key}={value}"]
    for key, value in (env or {}).items():
        argv += ["-e", f"{key}={value}"]
    argv += ["--rootfs", str(rootfs), *command]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


def main(argv: list[str]) -> int:
    """`python -m tests.containers rootfs DIR [--cuda-sim]`: build the demo's tiny rootfs."""
    if len(argv) not in (2, 3) or argv[0] != "rootfs" or argv[2:] not in ([], ["--cuda-sim"]):
        print("usage: python -m tests.containers rootfs DIR [--cuda-sim]", file=sys.stderr)
        return 2
    root = build_base_rootfs(Path(argv[1]))
    if argv[2:]:
        add_cuda_sim(root)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
