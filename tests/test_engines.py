"""`fcspctl install/uninstall --engine ...` on real sample configuration files: every other
setting and comment survives, install is idempotent, uninstall restores the meaning (for
containerd, the very text), --dry-run writes nothing, and a backup is kept."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from fcsp_hook.ctl import engines
from fcsp_hook.ctl import main as ctl
from fcsp_hook.hook import hooksd

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
