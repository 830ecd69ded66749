"""fcsp-runtime under a real engine: `podman --runtime <fcsp-runtime>`, the runtime command
line Docker and containerd use too, with NO hooks.d entry (an empty --hooks-dir), so the
hook runs only because the wrapper put it into config.json."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fcsp_hook.hook import runtime
from tests.containers import GLIBC_IN_ROOTFS, HookSetup, forget_next_runtime, podman

pytestmark = pytest.mark.e2e

GPU = {"NVIDIA_VISIBLE_DEVICES": "0"}
LIB = "/run/fcsp/libvgpu.so"
CAT = str(GLIBC_IN_ROOTFS)


@dataclass
class RuntimeSetup:
    """A launcher that runs this checkout's fcsp-runtime, recording its argv and the argv
    the next runtime (runc, behind a recorder) receives, one file per invocation."""

    hook: HookSetup  # its hooks_dir is empty: podman itself adds no hook
    launcher: Path
    received: Path
    handed: Path

    @staticmethod
    def _argvs(directory: Path) -> list[list[str]]:
        return [p.read_text().split("\0")[:-1] for p in sorted(directory.iterdir())]

    def received_argvs(self) -> list[list[str]]:
        return self._argvs(self.received)

    def handed_argvs(self) -> list[list[str]]:
        return self._argvs(self.handed)


def _script(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def _record(directory: Path) -> str:
    # One file per call, named so that a directory listing is in call order.
    return f"printf '%s\\0' \"$@\" > {directory}/$(date +%s%N)-$$\n"


@pytest.fixture
def fcsp_runtime(tmp_path: Path, e2e_ready: None, hook_python: Path) -> Iterator[RuntimeSetup]:
    hook = HookSetup.create(tmp_path / "fcsp", hook_python)
    empty = tmp_path / "no-hooks.d"
    empty.mkdir()
    received, handed = tmp_path / "received", tmp_path / "handed"
    received.mkdir()
    handed.mkdir()
    runc = shutil.which("runc")
    assert runc is not None
    recorder = _script(tmp_path / "next-runtime", f'#!/bin/sh\n{_record(handed)}exec {runc} "$@"\n')
    with hook.config_path.open("a") as f:
        f.write(f'[runtime]\nnext = "{recorder}"\n')
    launcher = _script(
        tmp_path / "fcsp-runtime",
        "#!/bin/sh\n"
        + _record(received)
        + f"export {runtime.CONFIG_ENV}={hook.config_path}\n"
        + f'exec {hook_python} -I -m fcsp_hook.hook.runtime "$@"\n',
    )
    setup = RuntimeSetup(dataclasses.replace(hook, hooks_dir=empty), launcher, received, handed)
    yield setup
    shutil.rmtree(hook.run_dir, ignore_errors=True)
    forget_next_runtime(hook.config_path)


def _podman(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_fcsp_container_gets_its_slot_and_preload_through_the_wrapper(
    fcsp_runtime: RuntimeSetup, rootfs: Path
) -> None:
    """podman --runtime fcsp-runtime, no hooks.d: a glibc process maps libvgpu.so, the
    merged /etc/ld.so.preload names it first, the slot exists while the container does and
    is gone after `podman rm` (the poststop hook the wrapper added ran)."""
    (rootfs / "etc" / "ld.so.preload").write_text("/lib/x86_64-linux-gnu/libc.so.6\n")
    hook = fcsp_runtime.hook
    name = f"fcsp-rt-{uuid.uuid4().hex[:8]}"
    started = podman(
        hook,
        rootfs,
        [CAT],
        {"fcsp.sm": "40", "fcsp.tenant": "team-rt"},
        GPU,
        runtime=str(fcsp_runtime.launcher),
        extra=("-d", "-i", "--name", name),
    )
    assert started.returncode == 0, started.stderr
    try:
        maps = _podman("exec", name, CAT, "/proc/1/maps")
        assert maps.returncode == 0, maps.stderr
        assert LIB in maps.stdout
        preload = _podman("exec", name, CAT, "/etc/ld.so.preload")
        assert preload.stdout == f"{LIB}\n/lib/x86_64-linux-gnu/libc.so.6\n"
        container_id = _podman("inspect", "--format", "{{.Id}}", name).stdout.strip()
        assert hook.slots() == [hook.run_dir / "tenants" / container_id]
    finally:
        removed = _podman("rm", "-f", "-t", "0", name)
    assert removed.returncode == 0, removed.stderr
    assert hook.slots() == []
    events = [r["event"] for r in hook.log_records()]
    assert "FCSP hooks added to config.json" in events
    assert "tenant slot ready" in events


def test_every_runtime_call_reaches_runc_unchanged(
    fcsp_runtime: RuntimeSetup, rootfs: Path
) -> None:
    """Whatever podman sends (create with its flags, start, delete, ...), for a container
    with fcsp annotations and one without, the next runtime gets the same argv."""
    for notes in ({"fcsp.sm": "40"}, {}):
        result = podman(
            fcsp_runtime.hook,
            rootfs,
            [CAT, "/etc/hostname"],
            notes,
            GPU,
            runtime=str(fcsp_runtime.launcher),
        )
        assert result.returncode == 0, result.stderr
    received, handed = fcsp_runtime.received_argvs(), fcsp_runtime.handed_argvs()
    assert [a[0] for a in received].count("create") == 2
    assert handed == received


def test_container_without_fcsp_annotations_is_untouched(
    fcsp_runtime: RuntimeSetup, rootfs: Path
) -> None:
    """No fcsp.* annotation: no hook runs, no slot, no preload, nothing logged."""
    result = podman(
        fcsp_runtime.hook,
        rootfs,
        [CAT, "/proc/self/maps"],
        {"other.key": "fcsp.sm=40"},
        GPU,
        runtime=str(fcsp_runtime.launcher),
    )
    assert result.returncode == 0, result.stderr
    assert LIB not in result.stdout
    assert fcsp_runtime.hook.slots() == []
    assert not (rootfs / "etc" / "ld.so.preload").exists()
    assert fcsp_runtime.hook.log_records() == []


@pytest.mark.parametrize(
    ("annotation", "message"),
    [
        (("fcsp.sm", "abc"), 'annotation fcsp.sm="abc" is invalid: expected a percentage'),
        (("fcsp.sm.1", "40"), "GPU index 1 is out of range"),
    ],
)
def test_bad_annotation_fails_podman_run_with_one_line(
    fcsp_runtime: RuntimeSetup, rootfs: Path, annotation: tuple[str, str], message: str
) -> None:
    """podman run fails with the wrapper's one line (the hook's message); runc never gets
    the create, and no slot or preload is left."""
    result = podman(
        fcsp_runtime.hook,
        rootfs,
        [CAT, "/proc/self/maps"],
        dict([annotation]),
        GPU,
        runtime=str(fcsp_runtime.launcher),
    )
    assert result.returncode != 0
    assert message in result.stderr
    assert "fcsp-runtime: annotation fcsp." in result.stderr
    assert "Traceback" not in result.stderr
    ours = [line for line in result.stderr.splitlines() if "fcsp-runtime:" in line]
    assert len(ours) == 1
    assert "create" not in [a[0] for a in fcsp_runtime.handed_argvs()]
    assert fcsp_runtime.hook.slots() == []
    assert not (rootfs / "etc" / "ld.so.preload").exists()
