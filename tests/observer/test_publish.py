"""observer.publish: the state file fcspctl reads, the metrics, and systemd's STATUS line,
from the host state; at once when something changed, else once a second."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from fcsp_hook import nvml, observer
from fcsp_hook.observer import metrics, notify
from fcsp_hook.observer.mpsd import DaemonState
from fcsp_hook.observer.publish import Publish, metrics_snapshot, status_text
from fcsp_hook.observer.shares import Shares
from fcsp_hook.observer.tenants import Tenants
from fcsp_hook.slot import abi, files
from tests.observer.scene import MS, GiB, Scene

GPU = "GPU-00000000-0000-0000-0000-0000000000c3"


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, notify.Notifier]]:
    """A real sd_notify socket (abstract namespace) and a notifier bound to it."""
    name = f"fcsp-publish-{id(object())}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind("\0" + name)
    server.settimeout(10)
    notifier = notify.Notifier({"NOTIFY_SOCKET": "@" + name})
    yield server, notifier
    notifier.close()
    server.close()


def _published(scene: Scene) -> dict[str, object]:
    doc = json.loads((scene.run_dir / observer.STATE_FILE).read_text())
    assert isinstance(doc, dict)
    return doc


def test_the_state_file_says_what_fcspctl_shows(
    tmp_path: Path, notify_socket: tuple[socket.socket, notify.Notifier]
) -> None:
    server, notifier = notify_socket
    scene = Scene.create(tmp_path, gpus=(nvml.GpuInfo(0, GPU, 0, 80 * GiB),))
    try:
        scene.add("a", files.DeviceLimits(uuid=GPU, sm_requested_centi=3000))
        scene.add("b", files.DeviceLimits(uuid=GPU, sm_requested_centi=7000))
        scene.state.backends[GPU] = DaemonState(GPU, backend="mps", pid=42)
        publish = Publish(notifier, metrics.Metrics())
        scene.busy("a")
        scene.run(Tenants(), Shares(), publish)
        doc = _published(scene)
        tenants = doc["tenants"]
        assert isinstance(tenants, dict) and sorted(tenants) == ["a", "b"]
        assert tenants["a"]["backend"] == ["timeslice"]
        assert tenants["a"]["active"] == [True]
        assert doc["gpus"] == {GPU: {"contention_pct": 0, "tightness_pct": 0}}
        assert doc["backends"][GPU]["pid"] == 42  # type: ignore[index]
        assert doc["ticks"] == scene.state.ticks
        status = server.recv(4096).decode()
        assert status == f"STATUS=2 tenants on 1 GPU, contention 0.00; mps: {GPU[:12]} mps"
        publish.stop(scene.state)
        assert not (scene.run_dir / observer.STATE_FILE).exists()
    finally:
        scene.close()


def test_publishing_is_due_when_dirty_or_once_a_second(scene: Scene) -> None:
    publish = Publish(notify.Notifier({}), metrics.Metrics())
    scene.state.dirty = False
    assert not publish.due(scene.state, 500 * MS, 1_000 * MS)
    assert publish.due(scene.state, 1_000 * MS, 1_000 * MS)
    scene.state.dirty = True
    assert publish.due(scene.state, 0, 1_000 * MS)
    publish.run(scene.state, 0)
    assert not scene.state.dirty


def test_the_status_line_counts_tenants_and_gpus(scene: Scene) -> None:
    assert status_text(scene.state) == "0 tenants on 0 GPUs, contention 0.00"
    scene.add("a")
    scene.run(Tenants())
    assert status_text(scene.state) == "1 tenant on 1 GPU, contention 0.00"


def test_metrics_carry_the_quota_the_shim_enforces(tmp_path: Path) -> None:
    """Prometheus's quota of a slot with a byte quota and a percentage is the smaller."""
    scene = Scene.create(tmp_path, gpus=(nvml.GpuInfo(0, GPU, 0, 80 * GiB),))
    try:
        dev = files.DeviceLimits(uuid=GPU, mem_limit_bytes=30 * GiB, mem_limit_basis_points=2500)
        scene.add("a", dev, mode=abi.IsolationMode.STRICT)
        scene.run(Tenants())
        (sample,) = metrics_snapshot(scene.state).samples
        assert sample.mem_quota_bytes == 20 * GiB and sample.mode == "strict"
        assert sample.tenant == "team-a" and sample.gpu == GPU
    finally:
        scene.close()
