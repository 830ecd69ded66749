"""`fcspctl install/uninstall --engine ...` on real sample configuration files: every other
setting and comment survives, install is idempotent, uninstall restores the meaning (for
containerd, the very text), --dry-run writes nothing, and a backup is kept."""

from __future__ import annotations

import http.server
import json
import sys
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

from fcsp_hook.ctl import engines
from fcsp_hook.ctl import main as ctl
from fcsp_hook.errors import ConfigError
from fcsp_hook.hook import hooksd, next_runtime

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 only
    import tomli as tomllib

RUNTIME = "/usr/local/bin/fcsp-runtime"

# What an NVIDIA GPU host's daemon.json looks like after `nvidia-ctk runtime configure`.
DAEMON_JSON = """{
    "data-root": "/srv/docker",
    "default-runtime": "nvidia",
    "log-driver": "json-file",
    "log-opts": {"max-size": "10m", "max-file": "3"},
    "registry-mirrors": ["https://mirror.example.com"],
    "runtimes": {
        "nvidia": {"args": [], "path": "nvidia-container-runtime"},
        "crun": {"path": "/usr/bin/crun", "runtimeArgs": ["--debug"]}
    }
}
"""

# containerd 1.x (config version 2), as kubeadm hosts with the GPU operator have it.
CONTAINERD_V2 = """# containerd 1.7, managed by hand: keep these comments
version = 2
root = "/var/lib/containerd"

[grpc]
  address = "/run/containerd/containerd.sock"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:3.9"  # pinned

  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "nvidia"

    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = true

    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.nvidia]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.nvidia.options]
        BinaryName = "/usr/bin/nvidia-container-runtime"
        SystemdCgroup = true
"""

# containerd 2.x (config version 3): the CRI runtime plugin has a new name.
CONTAINERD_V3 = """version = 3

# containerd 2.0 defaults, trimmed
[plugins]
  [plugins.'io.containerd.cri.v1.runtime']
    enable_cdi = true
    [plugins.'io.containerd.cri.v1.runtime'.containerd]
      default_runtime_name = 'runc'
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
        runtime_type = 'io.containerd.runc.v2'
        [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
          SystemdCgroup = false
          NoNewKeyring = true
"""


def _settings(root: Path, **changes: object) -> engines.Settings:
    base: dict[str, object] = {"runtime_path": RUNTIME, "python": "/opt/fcsp/venv/bin/python3"}
    return engines.Settings(root=root, **{**base, **changes})  # type: ignore[arg-type]


def _install(engine: str, root: Path, **changes: object) -> engines.Change:
    change = engines.plan(engine, "install", _settings(root, **changes))
    engines.apply(change)
    return change


def _uninstall(engine: str, root: Path) -> engines.Change:
    change = engines.plan(engine, "uninstall", _settings(root))
    engines.apply(change)
    return change


def _place(root: Path, path: Path, text: str) -> Path:
    target = root / path.relative_to("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    return target


def _backups(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.name}{engines.BACKUP_INFIX}*"))


# ---- docker -------------------------------------------------------------------------------


def test_docker_install_adds_the_runtime_and_keeps_every_setting(tmp_path: Path) -> None:
    """runtimes.fcsp names fcsp-runtime; nvidia, crun, default-runtime and every other key
    stay as they were; the old file is kept as a timestamped backup."""
    path = _place(tmp_path, engines.DOCKER_CONFIG, DAEMON_JSON)
    _install("docker", tmp_path)
    new = json.loads(path.read_text())
    old = json.loads(DAEMON_JSON)
    assert new["runtimes"]["fcsp"] == {"path": RUNTIME}
    assert {k: v for k, v in new["runtimes"].items() if k != "fcsp"} == old["runtimes"]
    assert {k: v for k, v in new.items() if k != "runtimes"} == {
        k: v for k, v in old.items() if k != "runtimes"
    }
    assert [b.read_text() for b in _backups(path)] == [DAEMON_JSON]


def test_docker_install_twice_is_the_same_file(tmp_path: Path) -> None:
    """Idempotent: the second install changes nothing and makes no second backup."""
    path = _place(tmp_path, engines.DOCKER_CONFIG, DAEMON_JSON)
    _install("docker", tmp_path)
    once = path.read_bytes()
    second = _install("docker", tmp_path)
    assert not second.changed
    assert path.read_bytes() == once
    assert len(_backups(path)) == 1


def test_docker_default_runtime_and_uninstall_restore_the_meaning(tmp_path: Path) -> None:
    """--default-runtime makes fcsp the default; uninstall removes runtimes.fcsp and that
    default, leaving the other settings as the original file had them."""
    path = _place(tmp_path, engines.DOCKER_CONFIG, '{"log-level": "warn"}\n')
    _install("docker", tmp_path, default_runtime=True)
    assert json.loads(path.read_text()) == {
        "log-level": "warn",
        "runtimes": {"fcsp": {"path": RUNTIME}},
        "default-runtime": "fcsp",
    }
    _uninstall("docker", tmp_path)
    assert json.loads(path.read_text()) == {"log-level": "warn"}


def test_docker_uninstall_keeps_other_runtimes(tmp_path: Path) -> None:
    """Install then uninstall of a full daemon.json: semantically the original again."""
    path = _place(tmp_path, engines.DOCKER_CONFIG, DAEMON_JSON)
    _install("docker", tmp_path)
    _uninstall("docker", tmp_path)
    assert json.loads(path.read_text()) == json.loads(DAEMON_JSON)
    assert not _uninstall("docker", tmp_path).changed


def test_docker_install_without_a_daemon_json_creates_one(tmp_path: Path) -> None:
    """A host with no daemon.json gets one holding only the fcsp runtime (no backup)."""
    _install("docker", tmp_path)
    path = tmp_path / "etc" / "docker" / "daemon.json"
    assert json.loads(path.read_text()) == {"runtimes": {"fcsp": {"path": RUNTIME}}}
    assert _backups(path) == []


def test_docker_invalid_daemon_json_is_refused_untouched(tmp_path: Path) -> None:
    """A daemon.json that is not a JSON object is an error naming the file; nothing written."""
    path = _place(tmp_path, engines.DOCKER_CONFIG, '{"runtimes": ')
    with pytest.raises(engines.EngineError, match=r"daemon.json: daemon.json is not valid JSON"):
        engines.plan("docker", "install", _settings(tmp_path))
    assert path.read_text() == '{"runtimes": '
    assert _backups(path) == []


# ---- containerd ---------------------------------------------------------------------------


def _cri(doc: dict[str, object], version: int) -> dict[str, object]:
    node: object = doc
    for part in engines.runtimes_path(version):
        assert isinstance(node, dict)
        node = node[part]
    assert isinstance(node, dict)
    return node


@pytest.mark.parametrize(("text", "version"), [(CONTAINERD_V2, 2), (CONTAINERD_V3, 3)])
def test_containerd_install_appends_a_block_and_keeps_the_text(
    tmp_path: Path, text: str, version: int
) -> None:
    """containerd 1.x (version 2) and 2.x (version 3): the user's text, comments included,
    is kept byte for byte; the fcsp runtime is runc's shim running fcsp-runtime, passes
    fcsp.* pod annotations, and copies runc's options (SystemdCgroup above all)."""
    path = _place(tmp_path, engines.CONTAINERD_CONFIG, text)
    _install("containerd", tmp_path)
    new = path.read_text()
    assert new.startswith(text)
    assert engines.BEGIN_MARK in new
    runtimes = _cri(tomllib.loads(new), version)
    runc_options = runtimes["runc"]["options"]  # type: ignore[index]
    assert runtimes["fcsp"] == {
        "runtime_type": "io.containerd.runc.v2",
        "pod_annotations": ["fcsp.*"],
        "options": {"BinaryName": RUNTIME, **runc_options},
    }
    assert {k: v for k, v in runtimes.items() if k != "fcsp"} == _cri(tomllib.loads(text), version)
    assert [b.read_text() for b in _backups(path)] == [text]


@pytest.mark.parametrize("text", [CONTAINERD_V2, CONTAINERD_V3])
def test_containerd_install_twice_and_uninstall_restores_the_text(
    tmp_path: Path, text: str
) -> None:
    """Install twice = the same file; uninstall gives back the original text exactly."""
    path = _place(tmp_path, engines.CONTAINERD_CONFIG, text)
    _install("containerd", tmp_path)
    once = path.read_text()
    assert not _install("containerd", tmp_path).changed
    assert path.read_text() == once
    _uninstall("containerd", tmp_path)
    assert path.read_text() == text


def test_containerd_block_is_replaced_in_place(tmp_path: Path) -> None:
    """A block the user moved (or an older fcsp-runtime path) is rewritten where it is, and
    what follows it is kept."""
    path = _place(tmp_path, engines.CONTAINERD_CONFIG, CONTAINERD_V2)
    _install("containerd", tmp_path, runtime_path="/opt/fcsp/venv/bin/fcsp-runtime")
    path.write_text(path.read_text() + "\n[metrics]\n  address = '127.0.0.1:1338'\n")
    _install("containerd", tmp_path)
    new = path.read_text()
    assert new.count(engines.BEGIN_MARK) == 1
    assert new.endswith("[metrics]\n  address = '127.0.0.1:1338'\n")
    assert _cri(tomllib.loads(new), 2)["fcsp"]["options"]["BinaryName"] == RUNTIME  # type: ignore[index]


def test_containerd_fcsp_runtime_defined_by_the_user_is_not_redefined(tmp_path: Path) -> None:
    """runtimes.fcsp written by hand: the same BinaryName is accepted as is; a different one
    is an error naming the table (TOML cannot define it twice), and the file is untouched."""
    mine = CONTAINERD_V2 + (
        '\n[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.fcsp]\n'
        '  runtime_type = "io.containerd.runc.v2"\n'
        '  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.fcsp.options]\n'
        '    BinaryName = "/usr/local/bin/fcsp-runtime"\n'
    )
    path = _place(tmp_path, engines.CONTAINERD_CONFIG, mine)
    assert not _install("containerd", tmp_path).changed
    path.write_text(mine.replace("/usr/local/bin/fcsp-runtime", "/somewhere/else"))
    with pytest.raises(engines.EngineError, match=r"already defines .*runtimes\.fcsp"):
        engines.plan("containerd", "install", _settings(tmp_path))
    assert _backups(path) == []


def test_containerd_inline_runtimes_table_is_refused(tmp_path: Path) -> None:
    """runtimes as an inline table cannot gain a [..runtimes.fcsp] section: the result would
    not parse, so install refuses instead of writing a config containerd rejects."""
    text = (
        'version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd]\n'
        '  runtimes = { runc = { runtime_type = "io.containerd.runc.v2" } }\n'
    )
    path = _place(tmp_path, engines.CONTAINERD_CONFIG, text)
    with pytest.raises(engines.EngineError, match=r"cannot add .* safely .*declare"):
        engines.plan("containerd", "install", _settings(tmp_path))
    assert path.read_text() == text


@pytest.mark.parametrize("version", [2, 3])
def test_containerd_new_file_gets_the_asked_version(tmp_path: Path, version: int) -> None:
    """No config.toml yet: one is written with `version` first (containerd reads a file
    without it as version 1) and the runtime in that version's layout."""
    _install("containerd", tmp_path, containerd_version=version)
    doc = tomllib.loads((tmp_path / "etc" / "containerd" / "config.toml").read_text())
    assert doc["version"] == version
    assert _cri(doc, version)["fcsp"]["options"] == {"BinaryName": RUNTIME}  # type: ignore[index]


def test_containerd_file_without_version_is_version_1(tmp_path: Path) -> None:
    """containerd's own rule: tables but no `version` key means the version 1 layout
    (plugins.cri)."""
    text = "[plugins.cri.containerd]\n  snapshotter = 'overlayfs'\n"
    path = _place(tmp_path, engines.CONTAINERD_CONFIG, text)
    _install("containerd", tmp_path, containerd_version=3)
    assert "fcsp" in _cri(tomllib.loads(path.read_text()), 1)


# ---- podman, CRI-O ------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["podman", "crio"])
def test_hooks_d_entry_is_written_and_removed(tmp_path: Path, engine: str) -> None:
    """podman and CRI-O: the generated hooks.d entry in the directory both read by default;
    uninstall removes it, keeping a backup."""
    change = _install(engine, tmp_path)
    path = tmp_path / "usr" / "share" / "containers" / "oci" / "hooks.d" / "fcsp.json"
    assert change.path == path
    assert path.read_text() == hooksd.render(
        "/opt/fcsp/venv/bin/python3", Path("/etc/fcsp/config.toml")
    )
    assert not _install(engine, tmp_path).changed
    assert any("hooks_dir" in n or "podman" in n for n in change.notes)
    _uninstall(engine, tmp_path)
    assert not path.exists()
    assert len(_backups(path)) == 1


# ---- the command line ---------------------------------------------------------------------


def test_dry_run_prints_a_diff_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--dry-run: a unified diff on stdout; the file, its mtime and the directory are as
    they were (no backup either)."""
    path = _place(tmp_path, engines.CONTAINERD_CONFIG, CONTAINERD_V2)
    before = path.stat().st_mtime_ns
    args = ["install", "--engine", "containerd", "--root", str(tmp_path), "--dry-run"]
    assert ctl.main(["--config", str(tmp_path / "none.toml"), *args]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"--- {path}\n+++ {path}\n")
    assert '+  BinaryName = "/usr/local/bin/fcsp-runtime"' in out
    assert path.read_text() == CONTAINERD_V2
    assert path.stat().st_mtime_ns == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.toml"]


def test_fcspctl_install_and_uninstall_report_what_they_did(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The commands say which file they wrote, where the backup is, and what to do next;
    a second install says the engine is already configured."""
    _place(tmp_path, engines.DOCKER_CONFIG, DAEMON_JSON)
    base = ["--config", str(tmp_path / "none.toml")]
    root = ["--engine", "docker", "--root", str(tmp_path)]
    assert ctl.main([*base, "install", *root, "--default-runtime"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"wrote {tmp_path}/etc/docker/daemon.json (backup: ")
    assert "systemctl reload docker" in out
    assert ctl.main([*base, "install", *root, "--default-runtime"]) == 0
    assert capsys.readouterr().out.endswith("already configured\n")
    assert ctl.main([*base, "uninstall", *root]) == 0
    assert "wrote" in capsys.readouterr().out


def test_default_runtime_is_for_docker_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--default-runtime with containerd is refused in one line (Kubernetes picks runtimes
    per pod with a RuntimeClass)."""
    args = ["install", "--engine", "containerd", "--root", str(tmp_path), "--default-runtime"]
    assert ctl.main(["--config", str(tmp_path / "none.toml"), *args]) == 1
    err = capsys.readouterr().err
    assert err == "fcspctl: --default-runtime is for docker only (Kubernetes: a RuntimeClass)\n"
    assert not (tmp_path / "etc").exists()


@pytest.mark.e2e
def test_podman_ignores_the_backup_left_in_hooks_d(tmp_path: Path, rootfs: Path) -> None:
    """Backups of fcsp.json sit in hooks.d itself: podman reads *.json only, so a backup
    (here one whose hook would fail every container) is never run."""
    import subprocess  # noqa: PLC0415  # only this test runs an engine

    from tests.containers import GLIBC_IN_ROOTFS, ULIMITS  # noqa: PLC0415

    hooks = tmp_path / "hooks.d"
    hooks.mkdir()
    failing: dict[str, object] = {"version": "1.0.0", "hook": {"path": "/bin/false"}}
    failing.update(when={"always": True}, stages=["prestart"])
    backup = hooks / f"fcsp.json{engines.BACKUP_INFIX}20261129-120000"
    backup.write_text(json.dumps(failing))
    argv = ["podman", "--hooks-dir", str(hooks), "run", "--rm", "--runtime", "runc", *ULIMITS]
    argv += ["--rootfs", str(rootfs), str(GLIBC_IN_ROOTFS), "/etc/passwd"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr


# ---- chaining on real nodes: next = "auto" and the node's own containerd layout ----------


def test_auto_finds_the_nvidia_runtime_where_operator_and_packages_put_it(tmp_path: Path) -> None:
    """next = "auto": nvidia-container-runtime on PATH first, then the GPU Operator's
    toolkit directory, then the packages' /usr/bin, and only then runc on PATH; the error
    names every place it looked."""
    path_dir, toolkit, usr_bin = tmp_path / "path", tmp_path / "toolkit", tmp_path / "usr-bin"
    places = (str(toolkit / "nvidia-container-runtime"), str(usr_bin / "nvidia-container-runtime"))
    runc = _executable(path_dir / "runc")
    assert next_runtime.resolve_next("auto", str(path_dir), places) == str(runc)
    packaged = _executable(usr_bin / "nvidia-container-runtime")
    assert next_runtime.resolve_next("auto", str(path_dir), places) == str(packaged)
    operator = _executable(toolkit / "nvidia-container-runtime")
    assert next_runtime.resolve_next("auto", str(path_dir), places) == str(operator)
    on_path = _executable(path_dir / "nvidia-container-runtime")
    assert next_runtime.resolve_next("auto", str(path_dir), places) == str(on_path)
    nowhere = (str(tmp_path / "none" / "nvidia-container-runtime"),)
    with pytest.raises(ConfigError, match=r"found neither .* at .*none/nvidia-container-runtime"):
        next_runtime.resolve_next("auto", str(tmp_path / "empty"), nowhere)
    assert next_runtime.NVIDIA_LOCATIONS == (
        "/usr/local/nvidia/toolkit/nvidia-container-runtime",
        "/usr/bin/nvidia-container-runtime",
    )


def _executable(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


V2 = 'plugins."io.containerd.grpc.v1.cri".containerd'
V3 = 'plugins."io.containerd.cri.v1.runtime".containerd'
OPERATOR_RUNTIME = "/usr/local/nvidia/toolkit/nvidia-container-runtime"
K3S_DIR = "/var/lib/rancher/k3s/agent/etc/containerd"
RKE2_DIR = "/var/lib/rancher/rke2/agent/etc/containerd"


def _runtimes_toml(prefix: str, default: str, runtimes: Mapping[str, Mapping[str, object]]) -> str:
    """A CRI plugin's runtimes, as the tools that write them lay them out."""
    out = [f"[{prefix}]"] + ([f'  default_runtime_name = "{default}"'] if default else [])
    for name, options in runtimes.items():
        out += ["", f'[{prefix}.runtimes."{name}"]', '  runtime_type = "io.containerd.runc.v2"']
        out += [f'[{prefix}.runtimes."{name}".options]']
        out += [f"  {k} = {json.dumps(v)}" for k, v in options.items()]
    return "\n".join(out) + "\n"


RUNC: dict[str, dict[str, object]] = {"runc": {"SystemdCgroup": True}}
OPERATOR: dict[str, dict[str, object]] = {
    "nvidia": {"BinaryName": OPERATOR_RUNTIME, "SystemdCgroup": True},
    "nvidia-cdi": {"BinaryName": OPERATOR_RUNTIME + ".cdi", "SystemdCgroup": True},
}


@dataclass(frozen=True)
class Node:
    """A node's containerd configuration as a tool left it, and where FCSP's runtime must
    go on it."""

    name: str
    files: dict[str, str]
    target: str  # the file install writes
    service: str  # what restarts containerd there
    chained: str = OPERATOR_RUNTIME  # the GPU runtime fcsp-runtime hands containers to
    created: bool = False  # install creates target (uninstall removes it)


NODES = [
    Node(
        "gpu-operator, containerd 1.7: the toolkit edits config.toml",
        {
            "/etc/containerd/config.toml": 'version = 2\nroot = "/var/lib/containerd"\n\n'
            + _runtimes_toml(V2, "nvidia", {**RUNC, **OPERATOR})
        },
        "/etc/containerd/config.toml",
        "containerd",
    ),
    Node(
        "gpu-operator, containerd 2.x: the toolkit's conf.d drop-in",
        {
            "/etc/containerd/config.toml": 'imports = ["/etc/containerd/conf.d/*.toml"]\n'
            "version = 3\n\n" + _runtimes_toml(V3, "", RUNC),
            "/etc/containerd/conf.d/99-nvidia.toml": "version = 3\n\n"
            + _runtimes_toml(V3, "nvidia", {**RUNC, **OPERATOR}),
        },
        "/etc/containerd/conf.d/fcsp.toml",
        "containerd",
        created=True,
    ),
    Node(
        "containerd 2.3 (config version 4) importing conf.d: a drop-in of its own",
        {
            "/etc/containerd/config.toml": 'version = 4\nimports = ["conf.d/*.toml"]\n\n'
            + _runtimes_toml(V3, "nvidia", {**RUNC, **OPERATOR}),
        },
        "/etc/containerd/conf.d/fcsp.toml",
        "containerd",
        created=True,
    ),
    Node(
        "gpu-operator, containerd 1.7 with imports: the drop-in's CRI table wins",
        {
            "/etc/containerd/config.toml": 'version = 2\nimports = ["conf.d/*.toml"]\n\n'
            + _runtimes_toml(V2, "", RUNC),
            "/etc/containerd/conf.d/99-nvidia.toml": "version = 2\n\n"
            + _runtimes_toml(V2, "nvidia", {**RUNC, **OPERATOR}),
        },
        "/etc/containerd/conf.d/99-nvidia.toml",
        "containerd",
    ),
    Node(
        "toolkit packages: nvidia-ctk runtime configure, runc still the default",
        {
            "/etc/containerd/config.toml": "version = 2\n\n"
            + _runtimes_toml(
                V2,
                "runc",
                {**RUNC, "nvidia": {"BinaryName": "/usr/bin/nvidia-container-runtime"}},
            )
        },
        "/etc/containerd/config.toml",
        "containerd",
        chained="/usr/bin/nvidia-container-runtime",
    ),
    Node(
        "k3s with containerd 1.7: it renders config.toml, the template extends its base",
        {
            f"{K3S_DIR}/config.toml": "\n# File generated by k3s. DO NOT EDIT.\nversion = 2\n\n"
            '[plugins."io.containerd.grpc.v1.cri"]\n  sandbox_image = "rancher/pause:3.6"\n\n'
            + _runtimes_toml(V2, "", {**RUNC, "nvidia": {"BinaryName": OPERATOR_RUNTIME}})
        },
        f"{K3S_DIR}/config.toml.tmpl",
        "k3s",
        created=True,
    ),
    Node(
        "k3s with containerd 2.x: config-v3.toml.tmpl",
        {
            f"{K3S_DIR}/config.toml": "version = 3\n\n"
            + _runtimes_toml(V3, "", {**RUNC, "nvidia": {"BinaryName": OPERATOR_RUNTIME}})
        },
        f"{K3S_DIR}/config-v3.toml.tmpl",
        "k3s",
        created=True,
    ),
    Node(
        "k3s importing config-v3.toml.d: a drop-in of its own",
        {
            f"{K3S_DIR}/config.toml": "version = 3\n"
            f'imports = ["{K3S_DIR}/config-v3.toml.d/*.toml"]\n\n'
            + _runtimes_toml(V3, "", {**RUNC, "nvidia": {"BinaryName": OPERATOR_RUNTIME}})
        },
        f"{K3S_DIR}/config-v3.toml.d/fcsp.toml",
        "k3s",
        created=True,
    ),
    Node(
        "RKE2 with the operator's own template: the block is added to it",
        {
            f"{RKE2_DIR}/config.toml": "version = 2\n\n"
            + _runtimes_toml(V2, "nvidia", {**RUNC, **OPERATOR}),
            f"{RKE2_DIR}/config.toml.tmpl": '{{ template "base" . }}\n\n'
            '[plugins."io.containerd.grpc.v1.cri".registry]\n  config_path = "/etc/certs.d"\n',
        },
        f"{RKE2_DIR}/config.toml.tmpl",
        "rke2-server",
    ),
]


def _render(root: Path, node: Node) -> dict[str, object]:
    """containerd's CRI runtimes once the engine restarts: a template rendered over the
    distribution's config (its base), then every imported file merged key by key."""
    target = root / node.target.lstrip("/")
    if target.name.endswith(".tmpl"):
        base = (target.parent / "config.toml").read_text()
        doc = tomllib.loads(target.read_text().replace(engines.BASE_TEMPLATE, base))
        docs = [doc]
    else:
        docs = [tomllib.loads((root / p.lstrip("/")).read_text()) for p in sorted(node.files)]
        if node.created:
            docs.append(tomllib.loads(target.read_text()))
    merged: dict[str, object] = {}
    for doc in docs:
        version = doc.get("version", 1)
        merged.update(_cri(doc, version) if _has_cri(doc, version) else {})
    return merged


def _has_cri(doc: dict[str, object], version: int) -> bool:
    node: object = doc
    for part in engines.runtimes_path(version):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


@pytest.mark.parametrize("node", NODES, ids=[n.name for n in NODES])
def test_containerd_install_goes_where_the_nodes_containerd_reads_it(
    tmp_path: Path, node: Node
) -> None:
    """On each kind of node (GPU Operator on containerd 1.x and 2.x, its conf.d drop-in,
    the toolkit packages, k3s and RKE2 templates and drop-ins) install writes exactly one
    file, the one containerd reads the runtime from, leaving every other file as it was;
    the fcsp runtime copies the node's GPU runtime's options with BinaryName =
    fcsp-runtime; the notes name the runtime it chains to and the unit to restart;
    install again changes nothing, and uninstall gives back every file as it was."""
    for path, text in node.files.items():
        _place(tmp_path, Path(path), text)
    before = {p: (tmp_path / p.lstrip("/")).read_text() for p in node.files}
    change = _install("containerd", tmp_path)
    assert change.path == tmp_path / node.target.lstrip("/")
    for path, text in before.items():
        if path != node.target:
            assert (tmp_path / path.lstrip("/")).read_text() == text
    runtimes = _render(tmp_path, node)
    fcsp = runtimes["fcsp"]
    assert isinstance(fcsp, dict)
    assert fcsp["options"] == {"BinaryName": RUNTIME, "SystemdCgroup": True}
    assert fcsp["pod_annotations"] == ["fcsp.*"]
    assert fcsp["runtime_type"] == "io.containerd.runc.v2"
    assert any(f"hand containers to {node.chained}" in n for n in change.notes)
    assert any(f"systemctl restart {node.service}`" in n for n in change.notes)
    assert not _install("containerd", tmp_path).changed
    _uninstall("containerd", tmp_path)
    for path, text in before.items():
        assert (tmp_path / path.lstrip("/")).read_text() == text
    assert (tmp_path / node.target.lstrip("/")).exists() is not node.created


def test_containerd_chain_copies_the_gpu_runtimes_settings(tmp_path: Path) -> None:
    """The fcsp runtime takes the GPU runtime's settings (privileged_without_host_devices,
    its own pod annotations, base_runtime_spec) over runc's options; a GPU runtime that
    is not runc's shim (kata) is not chained to."""
    view = engines.CriView(
        {
            "runc": {"runtime_type": "io.containerd.runc.v2", "options": {"SystemdCgroup": True}},
            "nvidia": {
                "runtime_type": "io.containerd.runc.v2",
                "privileged_without_host_devices": False,
                "base_runtime_spec": "/etc/containerd/base.json",
                "pod_annotations": ["nvidia.cdi.k8s.io/*", "fcsp.*"],
                "options": {
                    "BinaryName": "/usr/bin/nvidia-container-runtime",
                    "NoNewKeyring": True,
                },
            },
            "kata-nvidia": {
                "runtime_type": "io.containerd.kata.v2",
                "options": {"BinaryName": "/usr/bin/nvidia-container-runtime"},
            },
        },
        default="kata-nvidia",
    )
    assert engines.gpu_runtime(view) == "nvidia"
    assert engines.containerd_entry(view, "nvidia", RUNTIME) == {
        "runtime_type": "io.containerd.runc.v2",
        "privileged_without_host_devices": False,
        "base_runtime_spec": "/etc/containerd/base.json",
        "pod_annotations": ["fcsp.*", "nvidia.cdi.k8s.io/*"],
        "options": {"BinaryName": RUNTIME, "SystemdCgroup": True, "NoNewKeyring": True},
    }
    assert engines.gpu_runtime(engines.CriView({"runc": {}})) == ""


def test_containerd_chain_elsewhere_says_to_set_next(tmp_path: Path) -> None:
    """A GPU runtime that "auto" does not look for: the note gives the exact [runtime] next
    line to set."""
    custom = "/opt/nvidia/bin/nvidia-container-runtime"
    text = "version = 2\n\n" + _runtimes_toml(V2, "nvidia", {"nvidia": {"BinaryName": custom}})
    _place(tmp_path, engines.CONTAINERD_CONFIG, text)
    change = _install("containerd", tmp_path)
    assert f'set [runtime] next = "{custom}" in /etc/fcsp/config.toml' in "\n".join(change.notes)


def test_containerd_block_left_in_another_file_is_named(tmp_path: Path) -> None:
    """A block from an install into another layout (containerd 2.x gained a conf.d import
    since): install refuses in one line naming that file; uninstall finds it there."""
    main = _place(
        tmp_path, engines.CONTAINERD_CONFIG, "version = 3\n\n" + _runtimes_toml(V3, "", RUNC)
    )
    _install("containerd", tmp_path)
    main.write_text('imports = ["/etc/containerd/conf.d/*.toml"]\n' + main.read_text())
    with pytest.raises(
        engines.EngineError, match=r"config.toml holds fcspctl's block .* uninstall"
    ):
        engines.plan("containerd", "install", _settings(tmp_path))
    change = _uninstall("containerd", tmp_path)
    assert change.path == main
    assert engines.BEGIN_MARK not in main.read_text()


# ---- Kubernetes: the node label ----------------------------------------------------------


class _Api(http.server.BaseHTTPRequestHandler):
    """A Kubernetes API server as far as the DaemonSet's steps need one."""

    calls: ClassVar[list[tuple[str, str, str, object]]] = []
    runtime = "containerd://1.7.27"

    def _answer(self, code: int, doc: object) -> None:
        body = json.dumps(doc).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _record(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        self.calls.append((self.command, self.path, self.headers["Authorization"], body))

    def do_GET(self) -> None:
        self._record()
        if self.path == "/api/v1/namespaces/fcsp-system/pods/fcsp-node-x7k2p":
            self._answer(200, {"spec": {"nodeName": "gpu-node-1"}})
        elif self.path == "/api/v1/nodes/gpu-node-1":
            self._answer(200, {"status": {"nodeInfo": {"containerRuntimeVersion": self.runtime}}})
        else:
            self._answer(404, {"kind": "Status", "message": f"{self.path} not found"})

    def do_PATCH(self) -> None:
        self._record()
        if self.headers["Content-Type"] != "application/merge-patch+json":
            self._answer(415, {"message": "unsupported patch"})
        elif self.path == "/api/v1/nodes/gpu-node-1":
            self._answer(200, {"metadata": {"name": "gpu-node-1"}})
        else:
            self._answer(403, {"message": 'nodes "other" is forbidden'})

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[engines.KubeApi, type[_Api]]]:
    """A local API server (plain HTTP) and the client the DaemonSet's pod would make."""
    handler = type("Api", (_Api,), {"calls": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    yield engines.KubeApi(f"http://127.0.0.1:{port}", "t0ken", "fcsp-system"), handler
    server.shutdown()
    server.server_close()


def test_node_is_labelled_ready_and_unlabelled(
    api: tuple[engines.KubeApi, type[_Api]],
) -> None:
    """set: a JSON merge patch of fcsp.io/ready=true on the pod's own node, with the
    service account's token; remove: the same patch with null (the label goes)."""
    client, server = api
    node = engines.pod_node(client, "fcsp-node-x7k2p")
    engines.label_node(client, node, True)
    engines.label_node(client, node, False)
    assert server.calls == [
        ("GET", "/api/v1/namespaces/fcsp-system/pods/fcsp-node-x7k2p", "Bearer t0ken", None),
        ("PATCH", "/api/v1/nodes/gpu-node-1", "Bearer t0ken",
         {"metadata": {"labels": {"fcsp.io/ready": "true"}}}),
        ("PATCH", "/api/v1/nodes/gpu-node-1", "Bearer t0ken",
         {"metadata": {"labels": {"fcsp.io/ready": None}}}),
    ]  # fmt: skip
    assert engines.READY_LABEL == "fcsp.io/ready"


def test_node_engine_follows_the_kubelets_runtime(
    api: tuple[engines.KubeApi, type[_Api]],
) -> None:
    """ENGINE=auto: crio where the node reports CRI-O, else containerd."""
    client, server = api
    assert engines.node_engine(client, "gpu-node-1") == "containerd"
    server.runtime = "cri-o://1.31.2"
    assert engines.node_engine(client, "gpu-node-1") == "crio"


def test_node_steps_outside_a_pod_and_on_api_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], api: tuple[engines.KubeApi, type[_Api]]
) -> None:
    """Outside a pod (no service account) the label step says so and succeeds, and the
    engine is containerd; an API error is one line naming the call and the server's
    message, exit 1."""
    assert engines.node_main(["label-node", "set"], {}, tmp_path / "none") == 0
    assert "not in a Kubernetes pod" in capsys.readouterr().out
    assert engines.node_main(["node-engine"], {}, tmp_path / "none") == 0
    assert capsys.readouterr().out == "containerd\n"
    client, _ = api
    with pytest.raises(
        engines.EngineError, match=r'PATCH /api/v1/nodes/other: 403 nodes "other" is'
    ):
        engines.label_node(client, "other", True)
    assert engines.node_main(["label-node", "maybe"], {}, tmp_path / "none") == 2


def test_node_steps_find_the_service_account(tmp_path: Path) -> None:
    """In a pod: the API server from KUBERNETES_SERVICE_HOST/PORT (IPv6 in brackets), the
    token, namespace and CA from the service account's files."""
    account = tmp_path / "sa"
    account.mkdir()
    (account / "token").write_text("abc\n")
    (account / "namespace").write_text("fcsp-system")
    (account / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    env = {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"}
    assert engines.KubeApi.in_cluster(env, account) == engines.KubeApi(
        "https://[fd00::1]:443", "abc", "fcsp-system", str(account / "ca.crt")
    )
    assert engines.KubeApi.in_cluster({}, account) is None


DOCS = Path(__file__).resolve().parent.parent / "docs" / "engines.md"
DOCUMENTED = {
    "gpu-operator-containerd-1": NODES[0],
    "gpu-operator-containerd-2": NODES[1],
    "k3s-containerd-1": next(n for n in NODES if n.name.startswith("k3s with containerd 1.7")),
}


@pytest.mark.parametrize("key", sorted(DOCUMENTED))
def test_docs_show_what_dry_run_prints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str
) -> None:
    """docs/engines.md's --dry-run outputs are what `fcspctl install --engine containerd
    --dry-run` prints on those nodes."""
    text = DOCS.read_text()
    marker = f"<!-- dry-run: {key} -->\n```\n"
    start = text.index(marker) + len(marker)
    shown = text[start : text.index("```\n", start)]
    for path, content in DOCUMENTED[key].files.items():
        _place(tmp_path, Path(path), content)
    args = ["install", "--engine", "containerd", "--root", str(tmp_path), "--dry-run"]
    assert ctl.main(["--config", str(tmp_path / "none.toml"), *args]) == 0
    assert capsys.readouterr().out.replace(str(tmp_path), "") == shown
