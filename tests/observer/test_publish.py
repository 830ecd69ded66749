"""observer.publish: the state file fcspctl reads, the metrics, and systemd's STATUS line,
from the host state; at once when something changed, else once a second."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from fcsp_hook import inventory, nvml, observer
from fcsp_hook.observer import metrics, notify
from fcsp_hook.observer.mpsd import DaemonState
from fcsp_hook.observer.publish import (
    METRICS_ADDRESS_ENV,
    Publish,
    metrics_snapshot,
    status_text,
)
from fcsp_hook.observer.shares import Shares
from fcsp_hook.observer.tenants import Tenants
from fcsp_hook.slot import abi, files, kubernetes
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


def _scrape(registry: CollectorRegistry, name: str) -> list[dict[str, str]]:
    """The label sets of one metric family, as a Prometheus scrape would see them."""
    text = generate_latest(registry).decode()
    return [
        s.labels for f in text_string_to_metric_families(text) if f.name == name for s in f.samples
    ]


def test_tenant_metrics_carry_pod_namespace_and_container(tmp_path: Path) -> None:
    """A slot the hook wrote for a Kubernetes container (containerd's or CRI-O's
    annotations) gives each of its series pod, namespace and container labels; values
    that cannot be Kubernetes names (a tenant's own annotations elsewhere) are left out;
    a slot without the record has them empty.  The state file carries them too."""
    scene = Scene.create(tmp_path, gpus=(nvml.GpuInfo(0, GPU, 0, 80 * GiB),))
    try:
        scene.add("a", files.DeviceLimits(uuid=GPU, sm_requested_centi=3000))
        scene.add("b", files.DeviceLimits(uuid=GPU, sm_requested_centi=7000))
        scene.add("c", files.DeviceLimits(uuid=GPU, sm_requested_centi=1000))
        for cid, notes in (
            ("a", {"io.kubernetes.cri.sandbox-name": "train-a",
                   "io.kubernetes.cri.sandbox-namespace": "ml",
                   "io.kubernetes.cri.container-name": "train"}),
            ("b", {"io.kubernetes.pod.name": "infer-b", "io.kubernetes.pod.namespace": "ml",
                   "io.kubernetes.container.name": 'x"} 1\nfake{a="b'}),
        ):  # fmt: skip
            for name, (data, _) in kubernetes.record(notes).items():
                (files.slot_path(scene.run_dir, cid) / name).write_bytes(data)
        exporter = metrics.Metrics()
        publish = Publish(notify.Notifier({}), exporter)
        scene.run(Tenants(), Shares(), publish)
        labels = {
            s["container_id"]: s for s in _scrape(exporter.registry, "fcsp_sm_requested_ratio")
        }
        assert {k: labels["a"][k] for k in ("pod", "namespace", "container", "gpu")} == {
            "pod": "train-a", "namespace": "ml", "container": "train", "gpu": GPU
        }  # fmt: skip
        assert (labels["b"]["pod"], labels["b"]["container"]) == ("infer-b", "")
        assert (labels["c"]["pod"], labels["c"]["namespace"], labels["c"]["container"]) == (
            "",
            "",
            "",
        )
        tenants = _published(scene)["tenants"]
        assert isinstance(tenants, dict)
        assert (tenants["a"]["pod"], tenants["a"]["namespace"]) == ("train-a", "ml")
    finally:
        scene.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _reachable(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=5):
            return True
    except OSError:
        return False


def test_metrics_listen_where_configured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """[observer] metrics_address is where the metrics listen (127.0.0.1 by default);
    FCSP_METRICS_ADDRESS, as the DaemonSet sets it, overrides it; a bad override is logged
    and the configured address kept."""
    for override, expected in (
        ("", "127.0.0.3"),
        ("127.0.0.2", "127.0.0.2"),
        ("nope", "127.0.0.3"),
    ):
        scene = Scene.create(tmp_path / (override or "none"), metrics_address="127.0.0.3")
        port = _free_port()
        scene.configure(metrics_port=port)
        monkeypatch.setenv(METRICS_ADDRESS_ENV, override)
        publish = Publish(notify.Notifier({}), metrics.Metrics())
        try:
            publish.start(scene.state)
            assert _reachable(expected, port)
            assert not _reachable("127.0.0.1", port)
            warned = scene.events(f"{METRICS_ADDRESS_ENV} ignored")
            assert bool(warned) is (override == "nope")
        finally:
            publish.stop(scene.state)
            scene.close()


def test_gpu_memory_totals_are_published_for_admission(tmp_path: Path) -> None:
    """At start the observer writes each GPU's UUID, minor and memory total (NVML) to
    <run_dir>/gpus.json, which the hook's admission reads; it stays when the observer stops."""
    scene = Scene.create(
        tmp_path,
        gpus=(nvml.GpuInfo(0, GPU, 0, 80 * GiB), nvml.GpuInfo(1, GPU[:-1] + "d", 3, 40 * GiB)),
    )
    publish = Publish(notify.Notifier({}), metrics.Metrics())
    try:
        publish.start(scene.state)
        publish.stop(scene.state)
        assert inventory.read(scene.run_dir) == (
            {GPU: 80 * GiB, GPU[:-1] + "d": 40 * GiB},
            {0: GPU, 3: GPU[:-1] + "d"},
        )
    finally:
        scene.close()
