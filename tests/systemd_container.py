"""A real systemd as PID 1 in a podman container, with fcsp-observer installed the way
`make install` lays it out, so the repository's unit file runs under the real manager.

The rootfs is a small directory: the host's /usr bind-mounted read-only (Debian is
merged-/usr, so /bin, /lib, /sbin are links into it), a few files in /etc, and
/opt/fcsp/venv, a venv of the distribution's /usr/bin/python3 holding a copy of this
checkout's fcsp_hook and of the observer's pure-Python dependencies (no network, no pip).
The distribution's python, not the test's: ProtectHome=yes hides /root and /home from
the service, so an interpreter there (pyenv) would fail to start with 203/EXEC.

podman runs it with --systemd=always (tmpfs /run, /tmp, the cgroup tree systemd wants,
SIGRTMIN+3 to stop) and three capabilities beyond its default set:
  SYS_ADMIN         without it systemd cannot build the service's mount namespace and then
                    silently runs it WITHOUT ProtectSystem=, ProtectHome=, PrivateTmp=,
                    ReadWritePaths=, Protect{Kernel*,ControlGroups}= (it assumes a
                    container and ignores them), so the unit would not be tested as written;
  SYS_PTRACE,       named in the unit's CapabilityBoundingSet= but not in podman's default
  DAC_READ_SEARCH   set: the observer gets the intersection, so they are added for the
                    service to get exactly the unit's set.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from tests import containers

REPO = containers.REPO
UNIT_FILE = REPO / "systemd" / "fcsp-observer.service"
UNIT = UNIT_FILE.name
SYSTEMD = Path("/usr/lib/systemd/systemd")
DISTRO_PYTHON = Path("/usr/bin/python3")
VENV = Path("/opt/fcsp/venv")
CONFIG = Path("/etc/fcsp/config.toml")
SIM_NVML = containers.SIM_DIR / "libnvidia-ml.so.1"
SIM_DIR_IN_BOX = Path("/opt/fcsp/sim")
# The observer's third-party imports (pyproject's dependencies minus the 3.10-only tomli).
DEPENDENCIES = ("structlog", "prometheus_client", "pynvml")
CAPABILITIES = ("SYS_ADMIN", "SYS_PTRACE", "DAC_READ_SEARCH")
# The only change to the unit: where the simulated NVML is, as the driver's library would
# be on the default search path of a GPU host.  No directive of the unit is overridden.
TEST_DROP_IN = f"[Service]\nEnvironment=LD_LIBRARY_PATH={SIM_DIR_IN_BOX}\n"
BOOT_TIMEOUT = 30.0


def _distro_python_ok() -> bool:
    if not DISTRO_PYTHON.is_file():
        return False
    out = subprocess.run(
        [str(DISTRO_PYTHON), "-c", "import sys; print(sys.version_info >= (3, 10))"],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.strip() == "True"


def usable() -> str | None:
    """None when a systemd container can be built here, else why not."""
    checks: list[tuple[bool, str]] = [
        (SYSTEMD.is_file(), f"{SYSTEMD} is not installed (apt-get install systemd)"),
        (
            all(Path("/", link).is_symlink() for link in ("bin", "lib", "sbin")),
            "/bin, /lib and /sbin are not links into /usr: the host is not merged-/usr",
        ),
        (_distro_python_ok(), f"{DISTRO_PYTHON} (3.10 or newer) is not installed"),
        (SIM_NVML.is_file(), f"{SIM_NVML} is not built (run make)"),
        *(
            (
                importlib.util.find_spec(name) is not None,
                f"the observer's dependency {name} is not installed (run make deps)",
            )
            for name in DEPENDENCIES
        ),
    ]
    reason = containers.podman_usable()
    return reason or next((why for ok, why in checks if not ok), None)


def _copy_module(name: str, site: Path) -> None:
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.origin is not None, name
    origin = Path(spec.origin)
    if spec.submodule_search_locations:  # a package: copy its directory
        shutil.copytree(origin.parent, site / name, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        shutil.copy2(origin, site / origin.name)


def _install_venv(root: Path) -> None:
    """/opt/fcsp/venv as `make install` makes it, without network: the package and its
    dependencies copied into site-packages, and pip's console script for fcsp-observer."""
    venv = root / VENV.relative_to("/")
    subprocess.run([str(DISTRO_PYTHON), "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(
        subprocess.run(
            [
                str(venv / "bin" / "python3"),
                "-c",
                "import sysconfig; print(sysconfig.get_paths()['purelib'])",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    shutil.copytree(
        REPO / "fcsp_hook", site / "fcsp_hook", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in DEPENDENCIES:
        _copy_module(name, site)
    script = venv / "bin" / "fcsp-observer"
    script.write_text(
        f"#!{VENV}/bin/python3\nimport sys\n\nfrom fcsp_hook.observer.daemon import main\n\n"
        'if __name__ == "__main__":\n    sys.exit(main())\n'
    )
    script.chmod(0o755)


def build_rootfs(root: Path) -> Path:
    """The tree podman boots: /usr comes from the host at run time (see boot)."""
    for d in ("usr", "etc", "run", "tmp", "var/tmp", "var/log", "proc", "sys", "dev"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "root").mkdir(mode=0o700, exist_ok=True)
    (root / "home").mkdir(exist_ok=True)
    for link in ("bin", "lib", "lib64", "sbin"):
        if Path("/", link).is_symlink():
            (root / link).symlink_to(os.readlink(Path("/", link)))
    etc = root / "etc"
    (etc / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
    )
    (etc / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    (etc / "machine-id").write_text("")  # empty: systemd makes a transient one
    (etc / "os-release").symlink_to("../usr/lib/os-release")
    # glibc finds /usr/lib/x86_64-linux-gnu through the cache, as on the host.
    shutil.copy2("/etc/ld.so.cache", etc / "ld.so.cache")
    system = etc / "systemd" / "system"
    system.mkdir(parents=True)
    (system / "default.target").symlink_to("/usr/lib/systemd/system/multi-user.target")
    # The unit exactly as the repository ships it, where `make install` puts it.
    shutil.copy2(UNIT_FILE, system / UNIT)
    drop_in = system / f"{UNIT}.d"
    drop_in.mkdir()
    (drop_in / "test-sim-nvml.conf").write_text(TEST_DROP_IN)
    sim = root / SIM_DIR_IN_BOX.relative_to("/")
    sim.mkdir(parents=True)
    shutil.copy2(SIM_NVML, sim / SIM_NVML.name)
    (root / CONFIG.parent.relative_to("/")).mkdir(parents=True)
    _install_venv(root)
    return root


class BootError(RuntimeError):
    """systemd did not come up in the container; the message says what podman/systemd said."""


@dataclass
class SystemdContainer:
    name: str
    root: Path

    @property
    def config(self) -> Path:
        """config.toml as the container sees it at /etc/fcsp/config.toml (the rootfs is
        used in place, so the host writes it directly)."""
        return self.root / CONFIG.relative_to("/")

    @classmethod
    def boot(cls, root: Path, hooks_dir: Path) -> SystemdContainer:
        name = f"fcsp-systemd-{uuid.uuid4().hex[:12]}"
        argv = [
            "podman",
            "--hooks-dir",
            str(hooks_dir),  # empty: a host's installed fcsp hook stays out of this
            "run",
            "-d",
            "--name",
            name,
            "--runtime",
            "runc",
            *containers.ULIMITS,
            "--systemd=always",
            "--network=none",  # loopback only: the metrics endpoint is on 127.0.0.1
            *(f"--cap-add={cap}" for cap in CAPABILITIES),
            "-v",
            "/usr:/usr:ro",
            "--rootfs",
            str(root),
            str(SYSTEMD),
        ]
        run = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        if run.returncode != 0:
            raise BootError(f"podman run failed: {run.stderr.strip()}")
        box = cls(name, root)
        try:
            box.wait_booted()
        except BootError:
            box.remove()
            raise
        return box

    def wait_booted(self) -> None:
        deadline = time.monotonic() + BOOT_TIMEOUT
        state = ""
        while time.monotonic() < deadline:
            state = self.exec("systemctl", "is-system-running").stdout.strip()
            if state in {"running", "degraded"}:
                return
            time.sleep(0.1)
        logs = subprocess.run(
            ["podman", "logs", self.name], capture_output=True, text=True, check=False
        )
        failed = self.exec("systemctl", "--failed", "--no-pager").stdout
        raise BootError(
            f"systemd did not finish booting in {BOOT_TIMEOUT:.0f} s (state {state!r}); "
            f"failed units:\n{failed}\n{logs.stdout[-2000:]}{logs.stderr[-2000:]}"
        )

    def exec(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """A command in the container; one that hangs (a start that never gets READY=1)
        comes back as exit status 124 rather than an exception, for the test to report."""
        command = ["podman", "exec", self.name, *argv]
        try:
            return subprocess.run(
                command, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess(command, 124, "", f"timed out after {timeout} s")

    def systemctl(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return self.exec("systemctl", "--no-pager", *argv)

    def show(self, *properties: str, unit: str = UNIT) -> dict[str, str]:
        out = self.systemctl("show", f"--property={','.join(properties)}", unit)
        assert out.returncode == 0, out.stderr
        return dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)

    def journal(self, unit: str = UNIT, pid: int | None = None) -> str:
        """The unit's journal; only what process `pid` logged when given."""
        match = [f"_PID={pid}"] if pid is not None else []
        return self.exec("journalctl", "--no-pager", "-o", "cat", "-u", unit, *match).stdout

    def read(self, path: str) -> str | None:
        out = self.exec("cat", path)
        return out.stdout if out.returncode == 0 else None

    def remove(self) -> None:
        subprocess.run(
            ["podman", "rm", "--force", "--time", "5", self.name],
            capture_output=True,
            timeout=60,
            check=False,
        )
