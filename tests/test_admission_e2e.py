"""Admission end to end: podman + runc run the real hook from hooks.d, and a container whose
strict share would take GPU 0 past 100 % does not start, with the hook's one line in
podman's error; racing containers cannot both take the last guarantee; the hook records a
Kubernetes container's pod, namespace and container in its slot."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest

from fcsp_hook.slot import kubernetes
from tests.containers import GLIBC_IN_ROOTFS, ULIMITS, HookSetup, podman

pytestmark = pytest.mark.e2e

GPU = {"NVIDIA_VISIBLE_DEVICES": "0"}
CAT = str(GLIBC_IN_ROOTFS)


def _strict(share: int) -> dict[str, str]:
    return {"fcsp.sm": str(share), "fcsp.mode": "strict"}


def _running(hook: HookSetup, rootfs: Path, notes: dict[str, str]) -> str:
    """A container that stays up (cat on an open stdin) with these annotations: its name."""
    name = f"fcsp-adm-{uuid.uuid4().hex[:8]}"
    started = podman(hook, rootfs, [CAT], notes, GPU, extra=("-d", "-i", "--name", name))
    assert started.returncode == 0, started.stderr
    return name


def _remove(*names: str) -> None:
    subprocess.run(
        ["podman", "rm", "-f", "-t", "0", "--ignore", *names],
        capture_output=True,
        timeout=120,
        check=False,
    )


def test_strict_share_past_the_gpu_does_not_start(hook: HookSetup, rootfs: Path) -> None:
    """With strict 70 % running on GPU 0, strict 40 % fails to start: podman's error ends
    with the hook's one line naming the GPU, the request and what is promised, and no slot
    is left; strict 30 % (exactly what is left) starts."""
    held = _running(hook, rootfs, _strict(70))
    try:
        refused = podman(hook, rootfs, [CAT, "/etc/hostname"], _strict(40), GPU)
        assert refused.returncode != 0
        line = (
            "admission: GPU 0 cannot guarantee fcsp.sm=40% (strict): 70% of its SMs is "
            "already promised to 1 container, 110% > 100%"
        )
        assert line in refused.stderr
        assert "Traceback" not in refused.stderr
        assert len(hook.slots()) == 1
        fits = podman(hook, rootfs, [CAT, "/etc/hostname"], _strict(30), GPU)
        assert fits.returncode == 0, fits.stderr
    finally:
        _remove(held)
    assert hook.slots() == []


def test_racing_containers_do_not_both_get_the_last_guarantee(
    hook: HookSetup, rootfs: Path
) -> None:
    """Three `podman run -d` started together, each strict 60 % of GPU 0: exactly one
    runs; the others fail with the admission line."""
    names = [f"fcsp-race-{uuid.uuid4().hex[:8]}" for _ in range(3)]
    argv = ["podman", "--hooks-dir", str(hook.hooks_dir), "run", "--runtime", "runc", *ULIMITS]
    notes = ["--annotation", "fcsp.sm=60", "--annotation", "fcsp.mode=strict"]
    gpu = ["-e", "NVIDIA_VISIBLE_DEVICES=0", "--rootfs", str(rootfs), CAT]
    procs = [
        subprocess.Popen(
            [*argv, "-d", "-i", "--name", name, *notes, *gpu],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in names
    ]
    try:
        results = [(p.wait(timeout=180), p.communicate()[1]) for p in procs]
        started = [err for code, err in results if code == 0]
        refused = [err for code, err in results if code != 0]
        assert len(started) == 1, results
        assert all("cannot guarantee fcsp.sm=60% (strict)" in err for err in refused), results
        assert len(hook.slots()) == 1
    finally:
        _remove(*names)


def test_warn_policy_starts_the_container_and_logs_why(
    tmp_path: Path, rootfs: Path, hook_python: Path
) -> None:
    """[admission] policy = "warn": the container that does not fit starts, and the hook's
    log has the admission line as a warning."""
    hook = HookSetup.create(tmp_path / "fcsp", hook_python, paths='[admission]\npolicy = "warn"\n')
    held = _running(hook, rootfs, _strict(70))
    try:
        over = podman(hook, rootfs, [CAT, "/etc/hostname"], _strict(40), GPU)
        assert over.returncode == 0, over.stderr
        warned = [r for r in hook.log_records() if r.get("admission") == "warn"]
        assert len(warned) == 1
        assert str(warned[0]["event"]).startswith("admission: GPU 0 cannot guarantee")
    finally:
        _remove(held)


def test_slot_records_the_kubernetes_container(hook: HookSetup, rootfs: Path) -> None:
    """The annotations containerd's CRI plugin puts in every container's spec name its pod,
    namespace and container: the hook records them in the slot for the observer's labels."""
    notes = {
        "fcsp.sm": "30",
        "io.kubernetes.cri.sandbox-name": "train-a",
        "io.kubernetes.cri.sandbox-namespace": "ml",
        "io.kubernetes.cri.container-name": "train",
    }
    name = _running(hook, rootfs, notes)
    try:
        (slot,) = hook.slots()
        assert kubernetes.read_record(slot) == {
            "pod": "train-a",
            "namespace": "ml",
            "container": "train",
        }
    finally:
        _remove(name)
