"""The fcsp-node image (image/Containerfile, `make image`): it builds; the DaemonSet's own
init-container script, read from etc/kubernetes/daemonset.yaml and run in the image with the
manifest's env and hostPath mounts under a temporary host root, puts FCSP on the "host" and
adds the fcsp runtime to containerd's config; the copied /opt/fcsp then runs in a container
whose root holds no libc at all (the host needs no Python and no library of its own); and the
main container's command, fcsp-observer, starts in the image.

Slow (a two-stage image build, about a minute): marked e2e and slow, so `pytest -m "not slow"`
leaves it out.  The build starts from debian:bookworm-slim; where no registry can be reached
it starts from one mmdebstrap makes from Debian's archive (made once, kept in podman's store);
with neither, the tests skip."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fcsp_hook.ctl import engines
from tests import containers

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

yaml = pytest.importorskip("yaml")

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = containers.REPO
DAEMONSET = REPO / "etc" / "kubernetes" / "daemonset.yaml"
BASE = "docker.io/library/debian:bookworm-slim"
# Made from Debian's archive where BASE cannot be pulled.
LOCAL_BASE = "localhost/fcsp-test/debian:bookworm-slim"
IMAGE = "localhost/fcsp-test/fcsp-node:test"
# The build stage trusts these (a TLS-intercepting proxy's CA, where the host has one).
HOST_CAS = Path("/usr/local/share/ca-certificates")
RUN = ("podman", "run", "--rm", "--runtime", "runc", "--network", "none", *containers.ULIMITS)
# A node's containerd config as kubeadm-style installs leave it: version 2, runc with the
# systemd cgroup driver, which the fcsp runtime must copy.
NODE_CONTAINERD = """\
# the node's own settings
version = 2

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
  SystemdCgroup = true
"""


def _run(argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def _pod() -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(DAEMONSET.read_text()) if d is not None]
    (ds,) = [d for d in docs if d["kind"] == "DaemonSet"]
    spec: dict[str, Any] = ds["spec"]["template"]["spec"]
    return spec


def _mounts(container: dict[str, Any], host: Path) -> list[str]:
    """`-v` flags for the container's volumeMounts: each hostPath under host (made, as
    DirectoryOrCreate does), at the manifest's mountPath."""
    paths = {v["name"]: v["hostPath"]["path"] for v in _pod()["volumes"]}
    flags = []
    for mount in container["volumeMounts"]:
        source = host / paths[mount["name"]].lstrip("/")
        source.mkdir(parents=True, exist_ok=True)
        flags += ["-v", f"{source}:{mount['mountPath']}{':ro' if mount.get('readOnly') else ''}"]
    return flags


def _env(container: dict[str, Any]) -> list[str]:
    return [f for e in container.get("env", []) for f in ("-e", f"{e['name']}={e['value']}")]


def _base_image() -> str:
    """The Debian image the build starts from: the registry's, else a local one made from
    Debian's archive by mmdebstrap; skips when neither can be had."""
    for image in (BASE, LOCAL_BASE):
        if _run(["podman", "image", "exists", image]).returncode == 0:
            return image
    pulled = _run(["podman", "pull", "-q", BASE], timeout=300)
    if pulled.returncode == 0:
        return BASE
    why = (pulled.stderr.strip().splitlines() or ["no output"])[-1]
    if shutil.which("mmdebstrap") is None:
        pytest.skip(
            f"cannot pull {BASE} ({why}), and no mmdebstrap to make it from Debian's archive "
            "(apt-get install mmdebstrap)"
        )
    with subprocess.Popen(
        ["mmdebstrap", "--quiet", "--variant=minbase", "--format=tar", "bookworm", "-"],
        stdout=subprocess.PIPE,
    ) as bootstrap:
        imported = subprocess.run(
            ["podman", "import", "-q", "-", LOCAL_BASE],
            stdin=bootstrap.stdout,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    if bootstrap.returncode != 0 or imported.returncode != 0:
        pytest.skip(f"cannot pull {BASE} ({why}) nor make it with mmdebstrap: {imported.stderr}")
    return LOCAL_BASE


@pytest.fixture(scope="module")
def node_image() -> Iterator[str]:
    """`make image`, tagged IMAGE; removed afterwards (no layer cache is kept either)."""
    reason = containers.podman_usable()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"the node image test cannot run in CI: {reason}")
        pytest.skip(reason)
    flags = ["--layers=false", "--runtime", "runc", *containers.ULIMITS]
    if any(HOST_CAS.glob("*.crt")):
        flags += ["-v", f"{HOST_CAS}:{HOST_CAS}:ro"]
    built = _run(
        [
            "make",
            "-s",
            "-C",
            str(REPO),
            "image",
            f"IMAGE={IMAGE}",
            f"IMAGE_BASE={_base_image()}",
            f"IMAGE_FLAGS={' '.join(flags)}",
        ],
        timeout=900,
    )
    assert built.returncode == 0, built.stdout[-4000:] + built.stderr[-4000:]
    yield IMAGE
    _run(["podman", "rmi", "-f", IMAGE])


def _install(image: str, root: Path) -> subprocess.CompletedProcess[str]:
    """The init container against the host root: the manifest's command, args, env and
    mounts."""
    (init,) = _pod()["initContainers"]
    argv = [*RUN, *_env(init), *_mounts(init, root), image]
    return _run([*argv, *init["command"], *init["args"]])


@dataclass
class Host:
    """A node's root as the init container left it, and what the init container printed."""

    root: Path
    installed: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def host(node_image: str, tmp_path_factory: pytest.TempPathFactory) -> Host:
    root = tmp_path_factory.mktemp("node") / "host"
    (root / "etc" / "containerd").mkdir(parents=True)
    (root / "etc" / "containerd" / "config.toml").write_text(NODE_CONTAINERD)
    return Host(root, _install(node_image, root))


def test_init_container_installs_fcsp_on_the_host(host: Host) -> None:
    """The library, /opt/fcsp (standalone Python and venv), the default config and
    fcsp-runtime land on the host; containerd's config keeps the node's text and gains the
    fcsp runtime (runc's shim running fcsp-runtime, runc's SystemdCgroup, fcsp.* pod
    annotations), with a backup of the old file and a word that containerd needs a restart."""
    out = host.installed
    assert out.returncode == 0, out.stdout + out.stderr
    root = host.root
    assert "wrote /host/etc/containerd/config.toml" in out.stdout
    assert "restart containerd on this node" in out.stdout

    library = root / "usr/local/lib/fcsp/libvgpu.so"
    assert library.read_bytes()[:4] == b"\x7fELF"
    assert library.stat().st_mode & 0o777 == 0o755
    # The native launcher and the hooks.d entry's client, static: any host's libc will do.
    for native in ("usr/local/bin/fcsp-runtime", "usr/local/lib/fcsp/fcsp-hook"):
        assert (root / native).read_bytes()[:4] == b"\x7fELF"
        assert (root / native).stat().st_mode & 0o777 == 0o755
        assert b"ld-linux" not in (root / native).read_bytes()[:4096], native
    python_runtime = root / "usr/local/lib/fcsp/fcsp-runtime.py"
    # Isolated, and without site: the package's directory (the venv's) is put on sys.path.
    shebang, _, path_line = python_runtime.read_text().splitlines()[:3]
    assert shebang == "#!/opt/fcsp/venv/bin/python3 -IS"
    assert path_line.startswith('sys.path.insert(0, "/opt/fcsp/venv/lib/python3'), path_line
    assert (root / "etc/fcsp/config.toml").read_text() == (REPO / "etc/config.toml").read_text()
    venv_python = root / "opt/fcsp/venv/bin/python3"
    assert os.readlink(venv_python) == "/opt/fcsp/python/bin/python3"
    for name in ("fcspctl", "fcsp-hook", "fcsp-observer"):
        assert (root / "opt/fcsp/venv/bin" / name).is_file()
    assert (root / "opt/fcsp/python/lib/libc.so.6").is_file()

    config = root / "etc/containerd/config.toml"
    text = config.read_text()
    assert text.startswith(NODE_CONTAINERD)
    cri = tomllib.loads(text)["plugins"]["io.containerd.grpc.v1.cri"]
    fcsp = cri["containerd"]["runtimes"][engines.RUNTIME_NAME]
    assert fcsp["runtime_type"] == engines.CONTAINERD_SHIM
    assert fcsp["pod_annotations"] == list(engines.POD_ANNOTATIONS)
    assert fcsp["options"] == {
        "BinaryName": engines.DEFAULT_RUNTIME_PATH,
        "SystemdCgroup": True,
    }
    (backup,) = config.parent.glob(f"config.toml{engines.BACKUP_INFIX}*")
    assert backup.read_text() == NODE_CONTAINERD


def test_init_container_again_keeps_the_hosts_files(host: Host, node_image: str) -> None:
    """A second run (a pod restart, an upgrade) leaves containerd's config and the
    operator's config.toml as they are, and asks for no restart."""
    mine = host.root / "etc/fcsp/config.toml"
    original = mine.read_text()
    mine.write_text(original + "\n# the operator's edit\n")
    config = host.root / "etc/containerd/config.toml"
    before = config.read_text()
    try:
        again = _install(node_image, host.root)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "/host/etc/containerd/config.toml: already configured" in again.stdout
        assert "restart containerd" not in again.stdout
        assert config.read_text() == before
        assert len(list(config.parent.glob(f"config.toml{engines.BACKUP_INFIX}*"))) == 1
        assert mine.read_text().endswith("# the operator's edit\n")
    finally:
        mine.write_text(original)


# The OCI state of a container's removal once it is gone.
GONE = (
    '{"ociVersion": "1.0.2", "id": "gone", "status": "stopped", "bundle": "/nonexistent", '
    '"annotations": {"fcsp.sm": "40"}}'
)


def test_copied_tree_runs_with_nothing_from_the_host(host: Host, tmp_path: Path) -> None:
    """The host's copy of /opt/fcsp, the config and fcsp-runtime, mounted at their paths in a
    container whose root is busybox-static alone (no libc, no Python): fcspctl runs, checks
    the config, the hook imports, fcsp-hookd serves the hook's client, and fcsp-runtime
    hands a command to the next runtime."""
    rootfs = tmp_path / "rootfs"
    for d in ("bin", "usr/bin", "etc", "proc", "sys", "dev", "tmp", "run"):
        (rootfs / d).mkdir(parents=True)
    shutil.copy2(containers.BUSYBOX, rootfs / "bin" / "busybox")
    (rootfs / "bin" / "sh").symlink_to("busybox")
    (rootfs / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    runc = rootfs / "usr" / "bin" / "runc"
    runc.write_text('#!/bin/sh\necho "next runtime: $*"\n')
    runc.chmod(0o755)
    # The hook's modules, and glibc's compatibility libraries as a host library built
    # against an older glibc (the driver's libnvidia-ml.so.1) asks for them.
    (rootfs / "probe.py").write_text(
        "import ctypes, sys\n"
        "import fcsp_hook.hook.oci_hook, fcsp_hook.observer.daemon, fcsp_hook.hook.runtime\n"
        "for name in ('libpthread.so.0', 'libdl.so.2', 'librt.so.1'):\n"
        "    ctypes.CDLL(name)\n"
        "print('prefix', sys.prefix)\n"
    )
    script = (
        "/opt/fcsp/venv/bin/fcspctl --help\n"
        "/opt/fcsp/venv/bin/fcspctl check-config\n"
        "/opt/fcsp/venv/bin/python3 -I /probe.py\n"
        # What the hookd container runs; the client's fallback fails, so only a served
        # request succeeds (the removal of a container that is already gone).
        "/opt/fcsp/venv/bin/fcsp-hookd --config /etc/fcsp/config.toml &\n"
        "i=0; while [ ! -S /run/fcsp/hook.sock ] && [ $i -lt 300 ]; do\n"
        "  sleep 0.1; i=$((i+1))\n"
        "done\n"
        f"echo '{GONE}' | /usr/local/lib/fcsp/fcsp-hook --socket /run/fcsp/hook.sock "
        "--config /etc/fcsp/config.toml oci -- /bin/false\n"
        "echo served by fcsp-hookd\n"
        "/usr/local/bin/fcsp-runtime --version\n"
    )
    mounts = [
        ("opt/fcsp", "/opt/fcsp"),
        ("etc/fcsp", "/etc/fcsp"),
        ("usr/local/bin/fcsp-runtime", "/usr/local/bin/fcsp-runtime"),
        ("usr/local/lib/fcsp", "/usr/local/lib/fcsp"),
    ]
    flags = [f for src, dst in mounts for f in ("-v", f"{host.root / src}:{dst}:ro")]
    ran = _run([*RUN, *flags, "--rootfs", str(rootfs), "/bin/sh", "-ec", script])
    assert ran.returncode == 0, ran.stdout + ran.stderr
    lines = ran.stdout.splitlines()
    assert lines[0].startswith("usage: fcspctl")
    assert "/etc/fcsp/config.toml: ok" in lines
    assert "prefix /opt/fcsp/venv" in lines
    assert "served by fcsp-hookd" in lines
    assert lines[-1] == "next runtime: --version"


def test_observer_starts_in_the_image(node_image: str, tmp_path: Path) -> None:
    """The main container's command, with its mounts: fcsp-observer comes up (without NVML
    here), makes the tenants directory in the host's /run/fcsp and stops on SIGTERM."""
    observer, _ = _pod()["containers"]
    host = tmp_path / "host"
    mounts = _mounts(observer, host)
    # The observer mounts what the init container copied: the default config and library.
    shutil.copy2(REPO / "etc" / "config.toml", host / "etc" / "fcsp" / "config.toml")
    argv = [*RUN, *_env(observer), *mounts, node_image, "timeout", "--preserve-status", "3"]
    ran = _run([*argv, *observer["command"]])
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert '"event": "observer ready"' in ran.stdout + ran.stderr
    assert (host / "run" / "fcsp" / "tenants").is_dir()
